//! Short plain-text documents about one of a handful of topics.

use crate::Rng;

/// The topics documents are about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Topic {
    /// Recipes and kitchens.
    Cooking,
    /// Matches, teams and goals.
    Football,
    /// Rain, wind and forecasts.
    Weather,
    /// Planets, stars and rockets.
    Space,
    /// Songs, bands and instruments.
    Music,
    /// Plants, soil and flowers.
    Gardening,
}

impl Topic {
    /// Every topic, in class order.
    pub const ALL: [Topic; 6] = [
        Topic::Cooking,
        Topic::Football,
        Topic::Weather,
        Topic::Space,
        Topic::Music,
        Topic::Gardening,
    ];

    /// The English name (`cooking`).
    pub fn name(self) -> &'static str {
        match self {
            Topic::Cooking => "cooking",
            Topic::Football => "football",
            Topic::Weather => "weather",
            Topic::Space => "space",
            Topic::Music => "music",
            Topic::Gardening => "gardening",
        }
    }

    /// Nouns typical of the topic.
    fn nouns(self) -> &'static [&'static str] {
        match self {
            Topic::Cooking => &[
                "recipe", "oven", "soup", "kitchen", "onion", "pan", "flour", "sauce", "chef",
                "dinner", "bread", "spices",
            ],
            Topic::Football => &[
                "match", "goal", "team", "referee", "striker", "stadium", "ball", "coach",
                "league", "penalty", "fans", "keeper",
            ],
            Topic::Weather => &[
                "rain",
                "forecast",
                "wind",
                "storm",
                "cloud",
                "temperature",
                "sunshine",
                "snow",
                "thunder",
                "fog",
                "umbrella",
                "frost",
            ],
            Topic::Space => &[
                "planet",
                "rocket",
                "star",
                "orbit",
                "moon",
                "galaxy",
                "astronaut",
                "telescope",
                "comet",
                "satellite",
                "mars",
                "launch",
            ],
            Topic::Music => &[
                "song",
                "guitar",
                "band",
                "concert",
                "piano",
                "melody",
                "drums",
                "singer",
                "album",
                "rhythm",
                "orchestra",
                "chorus",
            ],
            Topic::Gardening => &[
                "garden",
                "seeds",
                "soil",
                "roses",
                "compost",
                "tomatoes",
                "hedge",
                "watering can",
                "flowers",
                "weeds",
                "shed",
                "lawn",
            ],
        }
    }

    /// Verbs typical of the topic.
    fn verbs(self) -> &'static [&'static str] {
        match self {
            Topic::Cooking => &["simmer", "bake", "chop", "stir", "season", "roast"],
            Topic::Football => &["score", "pass", "tackle", "defend", "shoot", "win"],
            Topic::Weather => &["rain", "blow", "clear", "freeze", "drizzle", "change"],
            Topic::Space => &["orbit", "launch", "explore", "observe", "land", "shine"],
            Topic::Music => &["sing", "play", "record", "perform", "tune", "rehearse"],
            Topic::Gardening => &["plant", "prune", "water", "dig", "grow", "weed"],
        }
    }
}

const TEMPLATES: [&str; 8] = [
    "The {n1} and the {n2} were ready by the afternoon.",
    "Everyone talked about the {n1} for days.",
    "We had to {v1} the {n1} before the {n2} arrived.",
    "Nobody expected the {n1} to {v1} so quickly.",
    "A good {n1} needs patience and a careful {n2}.",
    "Last week the {n1} was the main story in town.",
    "She said you should always {v1} near the {n2}.",
    "In the end the {n1} made all the difference.",
];

/// A document of 3–6 sentences about `topic`.
pub fn render(topic: Topic, rng: &mut Rng) -> String {
    let sentences = rng.range(3, 6);
    let mut out = Vec::with_capacity(sentences);
    for _ in 0..sentences {
        let template = rng.choose(&TEMPLATES).copied().unwrap_or(TEMPLATES[0]);
        let n1 = rng.choose(topic.nouns()).copied().unwrap_or("thing");
        let n2 = rng.choose(topic.nouns()).copied().unwrap_or("thing");
        let v1 = rng.choose(topic.verbs()).copied().unwrap_or("wait");
        out.push(
            template
                .replace("{n1}", n1)
                .replace("{n2}", n2)
                .replace("{v1}", v1),
        );
    }
    out.join(" ") + "\n"
}
