//! Rows of the varied (training) and unlike (test) styles of [`Style`].
//!
//! Each task has a list of question templates per style; `{it}` in a template
//! is replaced by a noun phrase for the item ("the picture", "this clip", "the
//! file"...), again from a list per style. The varied and unlike lists share no
//! template and no noun phrase, so no unlike question is ever a varied (or
//! classic) question: `tests/generate.rs` checks it. Images are drawn with
//! [`images::render_styled`]; beeps and documents are rendered as in the
//! classic style (only their questions vary).

use std::path::Path;

use crate::audio::{self, BeepSpec, Pitch, Timbre};
use crate::built::{self, Asked, ItemKind as Kind};
use crate::checks::{self, Truth};
use crate::documents::{self, Topic};
use crate::images::{self, Colour, Shape, ShapeSpec};
use crate::rows::{
    capitalise, compare_answer, compare_pair, lower_first, pick, user_assistant, write, Message,
    Row, Split, Style, Task, UNSURE,
};
use crate::{Error, Result, Rng};

use crate::templates::KIND_WORDS;
pub use crate::templates::{
    AUDIO_NOUNS, COLOUR, COMPARE, COUNT, DESCRIBE_AUDIO, DESCRIBE_IMAGE, DOCUMENT_NOUNS,
    IMAGE_NOUNS, NEUTRAL_NOUNS, PITCH, SHAPE, TOPIC, UNANSWERABLE,
};

fn lists(style: Style) -> usize {
    usize::from(style == Style::Unlike)
}

fn fill(template: &str, it: &str) -> String {
    capitalise(&template.replace("{it}", it))
}

/// The template lists (`[varied, unlike]`) of what a question asks.
fn templates(asked: Asked) -> [&'static [&'static str]; 2] {
    match asked {
        Asked::Shape => SHAPE,
        Asked::Colour => COLOUR,
        Asked::DescribeImage => DESCRIBE_IMAGE,
        Asked::Count => COUNT,
        Asked::Pitch => PITCH,
        Asked::DescribeAudio => DESCRIBE_AUDIO,
        Asked::Topic => TOPIC,
    }
}

/// A question asking `asked` about the one item of its kind in `style`.
fn ask(asked: Asked, style: Style, rng: &mut Rng) -> String {
    ask_as(asked, style, false, rng)
}

/// A question that names its item's kind ("the picture", never "this" or a
/// template without `{it}`): where several items are in play, only the kind
/// tells the model which one is meant.
fn named(asked: Asked, style: Style, rng: &mut Rng) -> String {
    ask_as(asked, style, true, rng)
}

fn ask_as(asked: Asked, style: Style, named: bool, rng: &mut Rng) -> String {
    let templates = templates(asked);
    let nouns = match asked.kind() {
        Kind::Image => IMAGE_NOUNS,
        Kind::Audio => AUDIO_NOUNS,
        Kind::Document => DOCUMENT_NOUNS,
    };
    let identifies_kind = |t: &str| {
        let lower = t.to_lowercase();
        KIND_WORDS.iter().any(|w| lower.contains(w))
    };
    // Where several items are in play (`named`), a question must tell which
    // one it means: by its noun, or (varied style, half the time) by
    // its own words, with a noun that names no kind or with none.
    let mut by_words = named && style == Style::Varied && rng.range(0, 1) == 0;
    // Half the other varied questions are built from parts (module `built`;
    // their noun phrases always name the item's kind).
    if style == Style::Varied && !by_words && rng.range(0, 1) == 0 {
        return surface(&built::question(asked, rng), style, rng);
    }
    let usable = |by_words: bool| -> Vec<&str> {
        templates[lists(style)]
            .iter()
            .copied()
            .filter(|t| {
                // A template without `{it}` may say "this" itself ("What
                // topic is this?"), which names no item either.
                !named || t.contains("{it}") && (!by_words || identifies_kind(t))
            })
            .collect()
    };
    let mut templates = usable(by_words);
    if templates.is_empty() {
        by_words = false;
        templates = usable(false);
    }
    let nouns: Vec<&str> = if by_words {
        NEUTRAL_NOUNS.to_vec()
    } else {
        nouns[lists(style)]
            .iter()
            .copied()
            .filter(|n| !named || !matches!(*n, "this" | "it"))
            .collect()
    };
    let template = pick(&templates, rng);
    let noun = if by_words {
        pick(&nouns, rng).to_string()
    } else {
        item_noun(asked.kind(), &nouns, style, rng)
    };
    surface(&fill(template, &noun), style, rng)
}

/// A noun phrase for an item of `kind` from `listed` (the style's list), or
/// in a third of the varied style's questions one built from parts
/// ([`built::noun`]: modifiers, tails, file names).
fn item_noun(kind: Kind, listed: &[&str], style: Style, rng: &mut Rng) -> String {
    if style == Style::Varied && rng.range(0, 2) == 0 {
        built::noun(kind, rng)
    } else {
        pick(listed, rng).to_string()
    }
}

/// How people actually type: sometimes lower case, sometimes without the
/// final mark, sometimes after a greeting (each style its own greetings).
fn surface(question: &str, style: Style, rng: &mut Rng) -> String {
    let mut q = question.to_string();
    if rng.range(0, 4) == 0 {
        q = q.trim_end_matches(['?', '.', '!']).to_string();
    }
    if rng.range(0, 4) == 0 {
        q = lower_first(&q);
    }
    if rng.range(0, 7) == 0 && !q.starts_with('/') {
        let greetings: &[&str] = match style {
            Style::Unlike => &["Howdy! ", "Salutations, ", "G'day, "],
            _ => &[
                "Hi! ",
                "Hey, ",
                "OK, ",
                "Quick question: ",
                "Please: ",
                "Q: ",
                "Hello! ",
                "Hiya, ",
                "Hey there! ",
                "Good evening, ",
                "Greetings. ",
                "Yo, ",
                "Hi, ",
                "Morning! ",
                "Dear assistant, ",
                "Hello again. ",
            ],
        };
        q = format!("{}{q}", pick(greetings, rng));
    }
    // The varied style also pads and mistypes: a model that has only seen
    // clean templates keys on their exact words, and a slip ("shpae") or a
    // "Thanks." after the question then sends it elsewhere.
    if style == Style::Varied && !q.starts_with('/') {
        if rng.range(0, 7) == 0 {
            q = if rng.range(0, 1) == 0 {
                format!("{}{q}", pick(PADDING_BEFORE, rng))
            } else {
                format!("{q}{}", pick(PADDING_AFTER, rng))
            };
        }
        if rng.range(0, 7) == 0 {
            q = typo(&q, rng);
        }
    }
    q
}

/// What people put before a question that asks nothing (varied style only;
/// none is an unlike-style greeting).
const PADDING_BEFORE: &[&str] = &[
    "Sorry, ",
    "Um, ",
    "I have a question. ",
    "Can I ask something? ",
    "Hello, ",
    "Right, ",
    "Okay so ",
    "Just curious, ",
    "And another thing. ",
    "Sorry to bother you, ",
    "Another question: ",
    "Help please. ",
];

/// ... and after it.
const PADDING_AFTER: &[&str] = &[
    " Thanks.",
    " please",
    " Thank you!",
    " I'm curious.",
    " Cheers.",
    " if you can",
    " :)",
    " Thanks in advance.",
    " Much appreciated.",
    " No rush.",
    " Ta.",
    " Quick answer is fine.",
];

/// One slip of the keyboard in a word of four or more letters (never its
/// first letter): two neighbouring letters swapped, or one left out. A slip
/// that spells a word an answer names ("there" -> "three") is drawn again.
fn typo(question: &str, rng: &mut Rng) -> String {
    let words: Vec<&str> = question.split(' ').collect();
    let long: Vec<usize> = (0..words.len())
        .filter(|&i| words[i].chars().filter(char::is_ascii_alphabetic).count() >= 4)
        .collect();
    if long.is_empty() {
        return question.to_string();
    }
    for _ in 0..16 {
        let at = long[rng.range(0, long.len() - 1)];
        let mut letters: Vec<char> = words[at].chars().collect();
        // Only among the word's letters, not a trailing mark.
        let end = letters
            .iter()
            .rposition(char::is_ascii_alphabetic)
            .unwrap_or(0);
        let i = rng.range(1, end.saturating_sub(1).max(1));
        if rng.range(0, 1) == 0 && i < end {
            letters.swap(i, i + 1);
        } else {
            letters.remove(i);
        }
        let slipped: String = letters.into_iter().collect();
        let bare = slipped
            .trim_matches(|c: char| !c.is_alphanumeric())
            .to_lowercase();
        if crate::rows::GROUPS
            .iter()
            .any(|g| g.contains(&bare.as_str()))
        {
            continue;
        }
        let mut out: Vec<String> = words.iter().map(|w| w.to_string()).collect();
        out[at] = slipped;
        return out.join(" ");
    }
    question.to_string()
}

/// Parts of off-topic requests ([`off_topic`]): none names an item, a
/// shape, a colour, a count, a pitch or a topic of the data.
const REQUEST_VERBS: &[&str] = &[
    "Write",
    "Compose",
    "Draw",
    "Sing",
    "Tell me",
    "Make",
    "Plan",
    "Find",
    "Send",
    "Read me",
    "Create",
    "Suggest",
    "Recommend",
    "Order",
    "Buy me",
    "Translate",
    "Print",
];
const REQUEST_OBJECTS: &[&str] = &[
    "a poem",
    "a letter to my boss",
    "an email",
    "a recipe for soup",
    "a riddle",
    "a shopping list",
    "a birthday card",
    "a workout plan",
    "a trip to Rome",
    "a bedtime story",
    "a speech",
    "some jokes",
    "a new password",
    "a name for my dog",
    "a cup of coffee",
    "a taxi",
    "flowers for my mum",
    "the news",
    "the lottery numbers",
    "a film for tonight",
    "a podcast",
    "my horoscope",
    "a gift idea",
    "a rap verse",
];
const FACTS: &[&str] = &[
    "population",
    "height",
    "age",
    "price",
    "length",
    "speed",
    "weight",
    "distance",
    "temperature",
    "capital",
    "currency",
    "language",
];
const THINGS: &[&str] = &[
    "Spain",
    "the Eiffel Tower",
    "a banana",
    "Canada",
    "the sun",
    "my car",
    "the Nile",
    "a cheetah",
    "Mount Fuji",
    "Brazil",
    "an elephant",
    "Berlin",
    "the ocean",
    "Mars",
];
const DEEDS: &[&str] = &[
    "invented",
    "discovered",
    "built",
    "founded",
    "wrote",
    "won",
    "named",
    "sold",
];
const DEED_OBJECTS: &[&str] = &[
    "the radio",
    "penicillin",
    "the pyramids",
    "Rome",
    "Hamlet",
    "the World Cup",
    "the internet",
    "electricity",
    "the bicycle",
    "the last election",
    "this company",
];
const CHORES: &[&str] = &[
    "tie a tie",
    "learn French",
    "change a tyre",
    "make tea",
    "reset my router",
    "grow tomatoes",
    "file my taxes",
    "get to the beach",
    "sleep better",
    "train my dog",
    "cook rice",
    "write a CV",
    "unlock my phone",
    "lower my rent",
];

/// What a user might ask done to an item ([`off_topic`]), which the model
/// cannot do: the honest reply, not a description.
const ITEM_CHORES: &[&str] = &[
    "forward",
    "email",
    "print",
    "delete",
    "rename",
    "upload",
    "compress",
    "back up",
    "share",
    "post",
    "save",
    "resize",
    "crop",
    "convert",
    "encrypt",
    "archive",
    "translate",
    "tweet",
    "frame",
    "sell",
];
const ITEM_CHORE_ENDS: &[&str] = &[
    ".",
    " to my sister.",
    " to my boss.",
    " for me.",
    " to the cloud.",
    " on my blog.",
    " to my desktop.",
    " as a PDF.",
    " by tomorrow.",
    " to my team?",
    " to grandma?",
    " now, please.",
];

/// How an item came to be ([`off_topic`]: "When was {it} recorded?").
const ITEM_MADE: &[&str] = &[
    "made", "recorded", "taken", "sent", "drawn", "edited", "uploaded", "shared", "saved",
    "created", "written", "posted", "scanned", "exported",
];
/// Facts about an item's file that it does not show ([`off_topic`]).
const ITEM_FACTS: &[&str] = &[
    "What's the file size of",
    "What resolution is",
    "What format is",
    "Who owns the rights to",
    "What date is on",
    "Which device made",
    "Who is the author of",
    "What's the file name of",
    "How old is",
    "Which program opened",
    "What licence covers",
];

/// An off-topic request built from parts (varied style, a quarter of the
/// unanswerable rows): the honest reply is then learnt for requests in
/// general, not only for the [`UNANSWERABLE`] templates, and for imperatives
/// ("Write a riddle.", "Draw a taxi.") beside an item as much as for
/// questions. (At half the rows, before the built questions of module
/// `built`, it taught that any unfamiliar words beside an item are off-topic:
/// image descriptions fell from 25 to 16 of 40 on the unlike v2 set.)
fn off_topic(rng: &mut Rng) -> String {
    match rng.range(0, 5) {
        // What no item here tells: who made it, when, its file's facts.
        5 => match rng.range(0, 1) {
            0 => format!(
                "{} was {{it}} {}?",
                pick(&["When", "Where", "Why", "How"], rng),
                pick(ITEM_MADE, rng)
            ),
            _ => format!("{} {{it}}?", pick(ITEM_FACTS, rng)),
        },
        // Something done to the item rather than asked about it ("Forward
        // {it} to my brother."): phase 9 described the image or named the
        // topic for these (unlike v6).
        4 => capitalise(&format!(
            "{}{} {{it}}{}",
            pick(&["", "", "Please ", "Can you ", "Could you "], rng),
            pick(ITEM_CHORES, rng),
            pick(ITEM_CHORE_ENDS, rng)
        )),
        0 => format!(
            "{} {}.",
            pick(REQUEST_VERBS, rng),
            pick(REQUEST_OBJECTS, rng)
        ),
        1 => format!("What is the {} of {}?", pick(FACTS, rng), pick(THINGS, rng)),
        2 => format!("Who {} {}?", pick(DEEDS, rng), pick(DEED_OBJECTS, rng)),
        _ => format!("How do I {}?", pick(CHORES, rng)),
    }
}

/// Item tokens in front of a question: `chat` puts each on its own line,
/// hand-written prompts use a space; both are drawn.
fn with_tokens(tokens: &[&str], question: &str, rng: &mut Rng) -> String {
    let separator = if rng.range(0, 1) == 0 { " " } else { "\n" };
    let mut text = String::new();
    for token in tokens {
        text.push_str(token);
        text.push_str(separator);
    }
    text + question
}

/// Everyday words for [`vague`] questions: none names a shape, colour, count,
/// pitch or topic, and none is a question word of the unanswerable templates.
const VAGUE_WORDS: &[&str] = &[
    "okay",
    "so",
    "well",
    "look",
    "here",
    "now",
    "please",
    "just",
    "quick",
    "thing",
    "stuff",
    "about",
    "any",
    "thoughts",
    "anything",
    "say",
    "something",
    "details",
    "info",
    "check",
    "out",
    "and",
    "or",
    "the",
    "a",
    "this",
    "that",
    "my",
    "your",
    "some",
    "more",
    "what",
    "on",
    "with",
    "hmm",
    "right",
    "again",
    "see",
    "know",
    "want",
    "need",
    "get",
    "make",
    "give",
    "let",
    "me",
    "you",
    "we",
    "is",
    "are",
    "there",
    "have",
    "got",
    "its",
    "which",
    "how",
    "can",
    "could",
    "would",
    "maybe",
    "really",
    "exactly",
    "main",
    "overall",
    "content",
    "inside",
    "whole",
    "quickly",
    "summary",
    "sure",
    "go",
    "ahead",
];

/// A made-up word of two or three consonant-vowel syllables ("tomibe").
pub(crate) fn pseudo_word(rng: &mut Rng) -> String {
    const CONSONANTS: &[u8] = b"bdfgklmnprstvz";
    const VOWELS: &[u8] = b"aeiou";
    loop {
        let word: String = (0..rng.range(2, 3))
            .flat_map(|_| {
                [
                    char::from(CONSONANTS[rng.range(0, CONSONANTS.len() - 1)]),
                    char::from(VOWELS[rng.range(0, VOWELS.len() - 1)]),
                ]
            })
            .collect();
        // Real words this can spell that name an item or a kind of item.
        if !matches!(word.as_str(), "note" | "tone" | "memo") {
            return word;
        }
    }
}

/// A question that asks nothing in particular about an item of `kind` (varied
/// style only): one to six everyday or made-up words, with or without a noun
/// for the item (never with `kind` `None`: the unanswerable rows without an
/// item, whose answer is the honest reply, since there is nothing to describe). Its answer is the item's full description, so that a question
/// the model does not understand still gets an answer about the item rather
/// than the honest reply (which the unanswerable rows keep for off-topic
/// questions): before these rows, most unlike-style questions with unseen
/// words were answered "I can't tell from this.".
fn vague(kind: Option<Kind>, rng: &mut Rng) -> String {
    let nouns = match kind {
        Some(Kind::Image) => IMAGE_NOUNS[0],
        Some(Kind::Audio) => AUDIO_NOUNS[0],
        Some(Kind::Document) => DOCUMENT_NOUNS[0],
        None => &[],
    };
    let mut words: Vec<String> = (0..rng.range(1, 6))
        .map(|_| {
            if rng.range(0, 2) == 0 {
                pseudo_word(rng)
            } else {
                pick(VAGUE_WORDS, rng).to_string()
            }
        })
        .collect();
    if !nouns.is_empty() && rng.range(0, 1) == 0 {
        let at = rng.range(0, words.len());
        words.insert(at, pick(nouns, rng).to_string());
    }
    let question = capitalise(&words.join(" ")) + pick(&["?", ".", "!", ""], rng);
    surface(&question, Style::Varied, rng)
}

/// Whether a describing row of `style` asks a [`vague`] question (a third of
/// the varied style's; never in the unlike or classic styles).
fn asks_vaguely(task: Task, style: Style, rng: &mut Rng) -> bool {
    style == Style::Varied
        && matches!(
            task,
            Task::ImageDescribe | Task::AudioDescribe | Task::DocumentTopic
        )
        && rng.range(0, 2) == 0
}

/// Whether a single-item row of `style` asks a yes/no question (module
/// `checks`: a sixth of the varied style's other rows; never in the unlike
/// or classic styles).
fn checks_yes_or_no(style: Style, rng: &mut Rng) -> bool {
    style == Style::Varied && rng.range(0, 5) == 0
}

/// Every question `style` can ask of a single-item task (for tests: the
/// varied and unlike sets must not overlap).
pub fn all_questions(style: Style) -> Vec<String> {
    let l = lists(style);
    let mut out = Vec::new();
    for (templates, nouns) in [
        (SHAPE, IMAGE_NOUNS),
        (COLOUR, IMAGE_NOUNS),
        (DESCRIBE_IMAGE, IMAGE_NOUNS),
        (COUNT, AUDIO_NOUNS),
        (PITCH, AUDIO_NOUNS),
        (DESCRIBE_AUDIO, AUDIO_NOUNS),
        (TOPIC, DOCUMENT_NOUNS),
        (UNANSWERABLE, IMAGE_NOUNS),
        (UNANSWERABLE, AUDIO_NOUNS),
        (UNANSWERABLE, DOCUMENT_NOUNS),
    ] {
        for t in templates[l] {
            for n in nouns[l] {
                out.push(fill(t, n));
            }
        }
    }
    for t in COMPARE[l] {
        for thing in ["a triangle", "a red shape"] {
            out.push(capitalise(&t.replace("{thing}", thing)));
        }
    }
    out
}

fn image_item(
    dir: &Path,
    path: &str,
    shape: Shape,
    colour: Colour,
    style: Style,
    rng: &mut Rng,
) -> Result<()> {
    let spec = ShapeSpec::random_styled(shape, colour, style, rng);
    let image = images::render_styled(&spec, style, rng);
    let bytes = images::png_bytes(&image).map_err(|message| Error::Image {
        path: dir.join(path),
        message,
    })?;
    write(dir, path, &bytes)
}

fn turn(role: &str, content: String) -> Message {
    Message {
        role: role.to_string(),
        content,
    }
}

/// One row of `task` in `style` (not [`Style::Classic`], whose rows are
/// `rows::make_row`'s).
pub(crate) fn make_row(
    dir: &Path,
    split: Split,
    task: Task,
    i: usize,
    style: Style,
    rng: &mut Rng,
) -> Result<Row> {
    let id = format!("{}-{}-{i:05}", split.name(), task.name());
    let base = format!("{}/", split.name());
    let mut row = Row {
        id: id.clone(),
        images: vec![],
        speech_audios: vec![],
        documents: vec![],
        messages: vec![],
    };
    let class = i % task.classes();
    let image_path = format!("{base}images/{id}.png");
    let audio_path = format!("{base}audio/{id}.wav");
    let document_path = format!("{base}documents/{id}.txt");
    match task {
        Task::ImageShape | Task::ImageColour | Task::ImageDescribe => {
            let (shape, colour) = match task {
                Task::ImageShape => (Shape::ALL[class], pick(&Colour::ALL, rng)),
                Task::ImageColour => (pick(&Shape::ALL, rng), Colour::ALL[class]),
                _ => (Shape::ALL[class % 3], Colour::ALL[class / 3]),
            };
            image_item(dir, &image_path, shape, colour, style, rng)?;
            row.images.push(image_path);
            let (asked, answer) = match task {
                Task::ImageShape => (Asked::Shape, format!("A {}.", shape.name())),
                Task::ImageColour => (Asked::Colour, format!("{}.", capitalise(colour.name()))),
                _ => (
                    Asked::DescribeImage,
                    format!("A {} {}.", colour.name(), shape.name()),
                ),
            };
            let (question, answer) = if asks_vaguely(task, style, rng) {
                (vague(Some(Kind::Image), rng), answer)
            } else if checks_yes_or_no(style, rng) {
                checks::question(asked, Truth::Image(shape, colour), &answer, rng)
            } else {
                (ask(asked, style, rng), answer)
            };
            row.messages = user_assistant(with_tokens(&["<image>"], &question, rng), answer);
        }
        Task::ImageCompare => {
            let target_second = class == 1;
            let by_shape = rng.range(0, 1) == 0;
            let (a, b) = compare_pair(by_shape, rng);
            for (suffix, (shape, colour)) in [("a", a), ("b", b)] {
                let path = format!("{base}images/{id}-{suffix}.png");
                image_item(dir, &path, shape, colour, style, rng)?;
                row.images.push(path);
            }
            // The same checked answer as the classic style.
            let (thing, answer) = compare_answer(a, b, by_shape, target_second);
            let template = pick(COMPARE[lists(style)], rng);
            let question = surface(
                &capitalise(&template.replace("{thing}", &thing)),
                style,
                rng,
            );
            row.messages =
                user_assistant(with_tokens(&["<image>", "<image>"], &question, rng), answer);
        }
        Task::AudioCount | Task::AudioPitch | Task::AudioDescribe => {
            let (count, pitch) = match task {
                Task::AudioCount => (class + 1, pick(&Pitch::ALL, rng)),
                Task::AudioPitch => (rng.range(1, 4), Pitch::ALL[class]),
                _ => (class % 4 + 1, Pitch::ALL[class / 4]),
            };
            write_audio(dir, &audio_path, count, pitch, style, rng)?;
            row.speech_audios.push(audio_path);
            let (asked, answer) = audio_question(task, count, pitch);
            let (question, answer) = if asks_vaguely(task, style, rng) {
                (vague(Some(Kind::Audio), rng), answer)
            } else if checks_yes_or_no(style, rng) {
                checks::question(asked, Truth::Audio(count, pitch), &answer, rng)
            } else {
                (ask(asked, style, rng), answer)
            };
            row.messages = user_assistant(with_tokens(&["<speech>"], &question, rng), answer);
        }
        Task::DocumentTopic => {
            let topic = Topic::ALL[class];
            write(
                dir,
                &document_path,
                documents::render(topic, rng).as_bytes(),
            )?;
            row.documents.push(document_path);
            let answer = format!("{}.", capitalise(topic.name()));
            let (question, answer) = if asks_vaguely(task, style, rng) {
                (vague(Some(Kind::Document), rng), answer)
            } else if checks_yes_or_no(style, rng) {
                checks::question(Asked::Topic, Truth::Document(topic), &answer, rng)
            } else {
                (ask(Asked::Topic, style, rng), answer)
            };
            row.messages = user_assistant(with_tokens(&["<document>"], &question, rng), answer);
        }
        Task::Unanswerable => {
            // A quarter of the varied rows ask a request built from parts instead.
            let built_request;
            let template = if style == Style::Varied && rng.range(0, 3) == 0 {
                built_request = off_topic(rng);
                built_request.as_str()
            } else {
                pick(UNANSWERABLE[lists(style)], rng)
            };
            // With no item, only the templates that do not name one; those
            // carry an item in half their rows (varied) or three quarters
            // (unlike, as generated before): an off-topic question beside an
            // item is what the honest reply must learn, but most such rows
            // taught the model that any unfamiliar wording means "can't tell".
            let kind = if template.contains("{it}") {
                rng.range(0, 2)
            } else if style == Style::Varied {
                [0, 1, 2, 3, 3, 3][rng.range(0, 5)]
            } else {
                rng.range(0, 3)
            };
            let question = match kind {
                0 => {
                    image_item(
                        dir,
                        &image_path,
                        pick(&Shape::ALL, rng),
                        pick(&Colour::ALL, rng),
                        style,
                        rng,
                    )?;
                    row.images.push(image_path);
                    {
                        let question = fill(
                            template,
                            &item_noun(Kind::Image, IMAGE_NOUNS[lists(style)], style, rng),
                        );
                        let question = surface(&question, style, rng);
                        with_tokens(&["<image>"], &question, rng)
                    }
                }
                1 => {
                    write_audio(
                        dir,
                        &audio_path,
                        rng.range(1, 4),
                        pick(&Pitch::ALL, rng),
                        style,
                        rng,
                    )?;
                    row.speech_audios.push(audio_path);
                    {
                        let question = fill(
                            template,
                            &item_noun(Kind::Audio, AUDIO_NOUNS[lists(style)], style, rng),
                        );
                        let question = surface(&question, style, rng);
                        with_tokens(&["<speech>"], &question, rng)
                    }
                }
                2 => {
                    write(
                        dir,
                        &document_path,
                        documents::render(pick(&Topic::ALL, rng), rng).as_bytes(),
                    )?;
                    row.documents.push(document_path);
                    {
                        let question = fill(
                            template,
                            &item_noun(Kind::Document, DOCUMENT_NOUNS[lists(style)], style, rng),
                        );
                        let question = surface(&question, style, rng);
                        with_tokens(&["<document>"], &question, rng)
                    }
                }
                // No item: half the varied rows ask a vague question, so
                // that unfamiliar words with nothing attached get the honest
                // reply, as unfamiliar words about an item get its description.
                _ if style == Style::Varied && rng.range(0, 1) == 0 => vague(None, rng),
                _ => surface(template, style, rng),
            };
            row.messages = user_assistant(question, UNSURE.to_string());
        }
        Task::MultiTurn => {
            // `class` picks the ordered pair of kinds (6 pairs). Half the
            // chats attach each item with the first question about it (as
            // `/image` then a question does in `chat`), then may add the third
            // kind and go back to an earlier item; the other half attach two
            // or three items at once and ask about each by its kind.
            const PAIRS: [(Kind, Kind); 6] = [
                (Kind::Image, Kind::Audio),
                (Kind::Image, Kind::Document),
                (Kind::Audio, Kind::Image),
                (Kind::Audio, Kind::Document),
                (Kind::Document, Kind::Image),
                (Kind::Document, Kind::Audio),
            ];
            let (first, second) = PAIRS[class];
            let third = [Kind::Image, Kind::Audio, Kind::Document]
                .into_iter()
                .find(|k| *k != first && *k != second)
                .unwrap_or(Kind::Image);
            let all_at_once = rng.range(0, 1) == 1;
            let mut kinds = vec![first, second];
            if rng.range(0, 1) == 1 {
                kinds.push(third);
            }
            // (kind, whether its token goes in this turn, whether the question must name it)
            let mut turns: Vec<(Kind, bool, bool)> = Vec::new();
            if all_at_once {
                let mut order = kinds.clone();
                for i in (1..order.len()).rev() {
                    let j = rng.range(0, i);
                    order.swap(i, j);
                }
                for kind in order {
                    turns.push((kind, false, true));
                }
            } else {
                for kind in &kinds {
                    turns.push((*kind, true, false));
                }
                if rng.range(0, 1) == 1 {
                    turns.push((pick(&kinds[..kinds.len() - 1], rng), false, true));
                }
            }
            // The items, drawn once each, in token order.
            let shape = pick(&Shape::ALL, rng);
            let colour = pick(&Colour::ALL, rng);
            let count = rng.range(1, 4);
            let pitch = pick(&Pitch::ALL, rng);
            let topic = pick(&Topic::ALL, rng);
            for kind in &kinds {
                match kind {
                    Kind::Image => {
                        image_item(dir, &image_path, shape, colour, style, rng)?;
                        row.images.push(image_path.clone());
                    }
                    Kind::Audio => {
                        write_audio(dir, &audio_path, count, pitch, style, rng)?;
                        row.speech_audios.push(audio_path.clone());
                    }
                    Kind::Document => {
                        write(
                            dir,
                            &document_path,
                            documents::render(topic, rng).as_bytes(),
                        )?;
                        row.documents.push(document_path.clone());
                    }
                }
            }
            let token = |kind: Kind| match kind {
                Kind::Image => "<image>",
                Kind::Audio => "<speech>",
                Kind::Document => "<document>",
            };
            let mut messages = Vec::new();
            for (n, (kind, attach, must_name)) in turns.into_iter().enumerate() {
                let question = |asked, rng: &mut Rng| {
                    if must_name {
                        named(asked, style, rng)
                    } else {
                        ask(asked, style, rng)
                    }
                };
                let (question, answer) = match kind {
                    Kind::Image => match rng.range(0, 2) {
                        0 => (question(Asked::Shape, rng), format!("A {}.", shape.name())),
                        1 => (
                            question(Asked::Colour, rng),
                            format!("{}.", capitalise(colour.name())),
                        ),
                        _ => (
                            question(Asked::DescribeImage, rng),
                            format!("A {} {}.", colour.name(), shape.name()),
                        ),
                    },
                    Kind::Audio => {
                        let task = [Task::AudioCount, Task::AudioPitch, Task::AudioDescribe]
                            [rng.range(0, 2)];
                        let (asked, answer) = audio_question(task, count, pitch);
                        (question(asked, rng), answer)
                    }
                    Kind::Document => (
                        question(Asked::Topic, rng),
                        format!("{}.", capitalise(topic.name())),
                    ),
                };
                let tokens: Vec<&str> = if all_at_once && n == 0 {
                    kinds.iter().map(|k| token(*k)).collect()
                } else if attach {
                    vec![token(kind)]
                } else {
                    Vec::new()
                };
                messages.push(turn("user", with_tokens(&tokens, &question, rng)));
                messages.push(turn("assistant", answer));
            }
            row.messages = messages;
        }
    }
    Ok(row)
}

/// Half the varied and unlike styles' clips space their beeps 0.3-1.0 s apart instead of
/// the classic 1.0-1.6 s: clips people make themselves ("beep-beep-beep") are
/// that quick, and the demo model, which read one audio position per second,
/// heard three such beeps as two (`xtask/demo-probe/blind.py`).
const QUICK_GAPS: (f64, f64) = (0.3, 1.0);

fn write_audio(
    dir: &Path,
    path: &str,
    count: usize,
    pitch: Pitch,
    style: Style,
    rng: &mut Rng,
) -> Result<()> {
    let mut spec = BeepSpec::random(count, pitch, rng);
    if style != Style::Classic && rng.range(0, 1) == 0 {
        spec.gap = rng.range_f(QUICK_GAPS.0, QUICK_GAPS.1);
    }
    let timbre = if style == Style::Varied && rng.range(0, 1) == 0 {
        vary_clip(&mut spec, rng)
    } else {
        Timbre::PLAIN
    };
    let samples = audio::render_with(&spec, &timbre, rng);
    write(dir, path, &audio::wav_bytes(&samples, audio::SAMPLE_RATE))
}

/// Half the varied style's clips (never the unlike style's) come through
/// here: a third get wider pitch bands (low 180-480 Hz, high 1,000-2,400 Hz,
/// against the classic 250-400 and 1,200-1,800), a third beeps 0.08-0.6 s long
/// after up to 1.2 s of silence, a quarter a quiet level, and all a
/// [`Timbre`]: any waveform, slow fades (a third), background hiss (half),
/// mains hum (a quarter). The demo model, trained on clean sine
/// beeps, miscounted beeps in recordings with hiss or a buzzer's tone.
fn vary_clip(spec: &mut BeepSpec, rng: &mut Rng) -> Timbre {
    if rng.range(0, 2) == 0 {
        spec.frequency = match spec.pitch {
            Pitch::Low => rng.range_f(180.0, 480.0),
            Pitch::High => rng.range_f(1000.0, 2400.0),
        };
    }
    if rng.range(0, 2) == 0 {
        spec.beep = rng.range_f(0.08, 0.6);
        spec.lead = rng.range_f(0.1, 1.2);
    }
    if rng.range(0, 3) == 0 {
        spec.amplitude = rng.range_f(0.08, 0.3);
    }
    Timbre {
        wave: pick(&audio::Wave::ALL, rng),
        fade: if rng.range(0, 2) == 0 {
            rng.range_f(0.1, 0.45)
        } else {
            0.0
        },
        // Never louder than a third of the beeps: the count must stay audible.
        hiss: if rng.range(0, 1) == 0 {
            rng.range_f(0.003, 0.06).min(spec.amplitude / 3.0)
        } else {
            0.0
        },
        hum: if rng.range(0, 3) == 0 {
            rng.range_f(0.01, 0.05)
        } else {
            0.0
        },
    }
}

fn audio_question(task: Task, count: usize, pitch: Pitch) -> (Asked, String) {
    let plural = if count == 1 { "beep" } else { "beeps" };
    match task {
        Task::AudioCount => (
            Asked::Count,
            format!("{} {plural}.", audio::count_word(count, true)),
        ),
        Task::AudioPitch => (Asked::Pitch, format!("{}.", capitalise(pitch.name()))),
        _ => (
            Asked::DescribeAudio,
            format!(
                "{} {} {plural}.",
                audio::count_word(count, true),
                pitch.name()
            ),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `question` names no word an answer names and is not in `unlike`.
    fn assert_names_no_answer_and_is_not_unlike(
        question: &str,
        unlike: &std::collections::BTreeSet<String>,
    ) {
        for word in question
            .to_lowercase()
            .split(|c: char| !c.is_alphanumeric())
        {
            assert!(
                !crate::rows::GROUPS.iter().any(|g| g.contains(&word)),
                "{question:?} names {word:?}"
            );
        }
        assert!(
            !unlike.contains(question),
            "{question:?} is an unlike question"
        );
    }

    /// Vague questions must not name what the answer names (they would then
    /// teach a wording, not "describe when in doubt"), and none may be a
    /// question of the unlike test set.
    #[test]
    fn vague_questions_name_nothing_the_answers_name() {
        let unlike: std::collections::BTreeSet<String> =
            all_questions(Style::Unlike).into_iter().collect();
        let mut rng = Rng::new(7);
        let mut seen = std::collections::BTreeSet::new();
        for i in 0..3000 {
            let kind = [
                Some(Kind::Image),
                Some(Kind::Audio),
                Some(Kind::Document),
                None,
            ][i % 4];
            let question = vague(kind, &mut rng);
            assert_names_no_answer_and_is_not_unlike(&question, &unlike);
            seen.insert(question);
        }
        // Made-up words make almost every one new.
        assert!(seen.len() > 2900, "only {} distinct", seen.len());
    }

    /// Built off-topic requests name nothing an answer names (their answer is
    /// the honest reply) and are never unlike-set questions.
    #[test]
    fn off_topic_requests_name_nothing_the_answers_name() {
        let unlike: std::collections::BTreeSet<String> =
            all_questions(Style::Unlike).into_iter().collect();
        let mut rng = Rng::new(11);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..2000 {
            let request = off_topic(&mut rng);
            assert_names_no_answer_and_is_not_unlike(&request, &unlike);
            seen.insert(request);
        }
        assert!(seen.len() > 400, "only {} distinct", seen.len());
    }

    /// No question built from parts is an unlike-set question (the unlike
    /// set measures wordings the model never saw).
    #[test]
    fn built_questions_are_never_unlike_questions() {
        let unlike: std::collections::BTreeSet<String> =
            all_questions(Style::Unlike).into_iter().collect();
        let mut rng = Rng::new(13);
        for asked in Asked::ALL {
            for _ in 0..4000 {
                let question = built::question(asked, &mut rng);
                assert!(
                    !unlike.contains(&question),
                    "{question:?} is an unlike question"
                );
            }
        }
    }

    /// A typo changes one word of four or more letters, keeps its first
    /// letter and its trailing mark, and leaves the other words alone.
    #[test]
    fn a_typo_changes_one_long_word_inside() {
        let mut rng = Rng::new(5);
        let question = "What shape is in the picture?";
        let mut changed = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let slipped = typo(question, &mut rng);
            assert_ne!(slipped, question);
            let (a, b): (Vec<&str>, Vec<&str>) =
                (question.split(' ').collect(), slipped.split(' ').collect());
            assert_eq!(a.len(), b.len());
            let diff: Vec<usize> = (0..a.len()).filter(|&i| a[i] != b[i]).collect();
            assert_eq!(diff.len(), 1, "{slipped}");
            let (old, new) = (a[diff[0]], b[diff[0]]);
            assert!(
                old.len() >= 4 && new.chars().next() == old.chars().next(),
                "{slipped}"
            );
            assert_eq!(old.ends_with('?'), new.ends_with('?'), "{slipped}");
            changed.insert(old.to_string());
        }
        // "What", "shape" and "picture?" all get their turn; "is", "in", "the" never.
        assert_eq!(changed.len(), 3, "{changed:?}");
        assert_eq!(typo("Is it in?", &mut rng), "Is it in?");
    }
}
