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
                "recipe",
                "oven",
                "soup",
                "kitchen",
                "onion",
                "pan",
                "flour",
                "sauce",
                "chef",
                "dinner",
                "bread",
                "spices",
                "oil",
                "garlic",
                "salt",
                "pepper",
                "butter",
                "eggs",
                "pasta",
                "rice",
                "meal",
                "ingredients",
                "stove",
                "pot",
                "cake",
                "lunch",
                "breakfast",
                "vegetables",
                "cheese",
                "cook",
                "menu",
                "frying pan",
            ],
            Topic::Football => &[
                "match",
                "goal",
                "team",
                "referee",
                "striker",
                "stadium",
                "ball",
                "coach",
                "league",
                "penalty",
                "fans",
                "keeper",
                "player",
                "players",
                "season",
                "cup",
                "tournament",
                "trophy",
                "whistle",
                "corner kick",
                "winger",
                "defender",
                "goalkeeper",
                "manager",
                "club",
                "kick-off",
                "half time",
                "football club",
                "free kick",
                "scoreline",
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
                "clouds",
                "sky",
                "breeze",
                "hail",
                "showers",
                "humidity",
                "degrees",
                "heatwave",
                "gale",
                "drought",
                "mist",
                "rainbow",
                "lightning",
                "puddles",
                "raincoat",
                "weather map",
                "cold front",
                "sunny spells",
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
                "universe",
                "astronomer",
                "spacecraft",
                "spaceship",
                "asteroid",
                "solar system",
                "nebula",
                "cosmos",
                "mission",
                "launch pad",
                "space station",
                "gravity",
                "meteor",
                "black hole",
                "crater",
                "planets",
                "stars",
                "rover",
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
                "violin",
                "drummer",
                "lyrics",
                "tune",
                "notes",
                "choir",
                "musician",
                "stage",
                "playlist",
                "trumpet",
                "bass",
                "composer",
                "chords",
                "harmony",
                "festival",
                "microphone",
                "songs",
                "record label",
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
                "plants",
                "bulbs",
                "spade",
                "rake",
                "greenhouse",
                "hose",
                "trowel",
                "flower pots",
                "blossom",
                "shrubs",
                "leaves",
                "fertiliser",
                "orchard",
                "harvest",
                "flower bed",
                "mulch",
                "gardener",
                "seedlings",
            ],
        }
    }

    /// Verbs typical of the topic.
    fn verbs(self) -> &'static [&'static str] {
        match self {
            Topic::Cooking => &[
                "simmer", "bake", "chop", "stir", "season", "roast", "fry", "boil", "taste", "mix",
                "serve", "grill",
            ],
            Topic::Football => &[
                "score",
                "pass",
                "tackle",
                "defend",
                "shoot",
                "win",
                "kick",
                "cross",
                "save",
                "train",
                "celebrate",
                "dribble",
            ],
            Topic::Weather => &[
                "rain",
                "blow",
                "clear",
                "freeze",
                "drizzle",
                "change",
                "pour",
                "snow",
                "warm up",
                "cool down",
                "thunder",
                "brighten",
            ],
            Topic::Space => &[
                "orbit",
                "launch",
                "explore",
                "observe",
                "land",
                "shine",
                "drift",
                "spin",
                "dock",
                "glow",
                "lift off",
                "reach orbit",
            ],
            Topic::Music => &[
                "sing", "play", "record", "perform", "tune", "rehearse", "strum", "compose",
                "dance", "hum", "listen", "conduct",
            ],
            Topic::Gardening => &[
                "plant",
                "prune",
                "water",
                "dig",
                "grow",
                "weed",
                "sow",
                "mow",
                "harvest",
                "rake",
                "bloom",
                "feed the plants",
            ],
        }
    }
}

const TEMPLATES: [&str; 20] = [
    "The {n1} and the {n2} were ready by the afternoon.",
    "Everyone talked about the {n1} for days.",
    "We had to {v1} the {n1} before the {n2} arrived.",
    "Nobody expected the {n1} to {v1} so quickly.",
    "A good {n1} needs patience and a careful {n2}.",
    "Last week the {n1} was the main story in town.",
    "She said you should always {v1} near the {n2}.",
    "In the end the {n1} made all the difference.",
    "Today we had to {v1} before checking the {n1} and the {n2}.",
    "The {n1} is what people notice before anything else.",
    "I wrote a short note about the {n1} and the {n2}.",
    "There was a long queue for the {n1} this morning.",
    "Experts say the {n1} matters more than the {n2}.",
    "If you want to {v1}, start with the {n1}.",
    "He spent the whole weekend with the {n1}.",
    "Most people {v1} at least once a week.",
    "Here is what you need to know about the {n1}.",
    "The {n1}, the {n2} and a little luck: that was all it took.",
    "Our neighbours asked how to {v1} without a {n1}.",
    "By the evening the {n1} looked completely different.",
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
