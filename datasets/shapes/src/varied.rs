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

use crate::audio::{self, BeepSpec, Pitch};
use crate::built::{self, Asked, ItemKind as Kind};
use crate::documents::{self, Topic};
use crate::images::{self, Colour, Shape, ShapeSpec};
use crate::rows::{
    capitalise, compare_answer, compare_pair, pick, user_assistant, write, Message, Row, Split,
    Style, Task, UNSURE,
};
use crate::{Error, Result, Rng};

/// Noun phrases for an image, per style. In the varied lists the first two
/// ("this", "it") name no kind: [`named`] leaves them out where several items
/// are in play.
pub const IMAGE_NOUNS: [&[&str]; 2] = [
    &[
        "this",
        "it",
        "the image",
        "this image",
        "the picture",
        "this picture",
        "the photo",
        "this photo",
        "the attached image",
        "my image",
        "my picture",
        "the uploaded picture",
        "this photograph",
        "the screenshot",
        "the frame",
        "the sketch",
        "this artwork",
        "the diagram",
        "this shot",
        "the visual",
    ],
    &[
        "the jpeg from my phone",
        "this doodle",
        "the still image I shared",
        "this thumbnail",
        "the scanned picture",
    ],
];

/// Noun phrases for an audio clip, per style (varied: "this", "it" first).
pub const AUDIO_NOUNS: [&[&str]; 2] = [
    &[
        "this",
        "it",
        "the clip",
        "this clip",
        "the recording",
        "this recording",
        "the audio",
        "this audio",
        "the sound",
        "this sound",
        "the audio clip",
        "the attached audio",
        "my recording",
        "the noise",
        "this audio file",
        "the wav",
        "this soundbite",
        "the signal",
    ],
    &[
        "this voice memo",
        "the m4a audio I sent",
        "the little jingle",
        "this sound message",
        "the ringtone",
    ],
];

/// Noun phrases for a document, per style (varied: "this", "it" first).
pub const DOCUMENT_NOUNS: [&[&str]; 2] = [
    &[
        "this",
        "it",
        "the document",
        "this document",
        "the file",
        "this file",
        "the text",
        "this text",
        "the attached document",
        "my file",
        "the paper",
        "the passage",
        "the essay",
        "this report",
        "the doc",
        "this story",
    ],
    &[
        "this write-up",
        "the blurb",
        "the memo text I pasted",
        "this excerpt",
        "the handout document",
    ],
];

/// Noun phrases that name no kind (varied style only): in chats with several
/// items they go with questions whose own words tell the kind ("How many
/// beeps are in the attachment?"), so the model learns to pick the item by
/// what is asked, not only by the noun (unseen nouns, "the track", sent
/// questions to the image before).
pub const NEUTRAL_NOUNS: &[&str] = &[
    "the attachment",
    "the item",
    "the upload",
    "what I sent",
    "the input",
    "the thing I shared",
    "this attachment",
];

/// Words that tie a question to one kind of item whatever its noun says
/// ("about" does not: "Tell me about {it}" describes any kind).
const KIND_WORDS: &[&str] = &[
    "shape", "colour", "color", "hue", "shade", "figure", "form", "outline", "drawn", "see",
    "pictured", "depicted", "beep", "tone", "pip", "bleep", "pitch", "high", "hear", "sound",
    "audible", "plays", "topic", "subject", "theme", "gist", "field", "discuss", "talk",
    "area", "text",
];

/// Question templates per task and style (`[varied, unlike]`).
pub const SHAPE: [&[&str]; 2] = [
    &[
        "What shape is in {it}?",
        "Which shape does {it} show?",
        "What shape do you see in {it}?",
        "Name the shape in {it}.",
        "Tell me the shape in {it}.",
        "What kind of shape is in {it}?",
        "Identify the shape in {it}.",
        "What is the shape in {it}?",
        "Which shape appears in {it}?",
        "What shape is shown in {it}?",
        "What shape is {it}?",
        "What shape is drawn in {it}?",
        "Which shape is in {it}?",
        "What form does the object in {it} have?",
        "What figure is in {it}?",
        "Which figure does {it} show?",
        "What geometric shape is in {it}?",
        "Is it a circle, a square or a triangle in {it}?",
        "Circle, square or triangle: what is in {it}?",
        "What is the outline of the object in {it}?",
        "Can you tell me the shape in {it}?",
        "Could you identify the shape in {it}?",
        "Please name the shape in {it}.",
        "Do you know what shape is in {it}?",
        "What shape has been drawn in {it}?",
        "Which shape can you see in {it}?",
        "What sort of shape does {it} contain?",
        "Tell me which shape {it} shows.",
        "What shape is the object in {it}?",
        "What shape is the thing in {it}?",
        "Look at {it}: what shape is it?",
        "In {it}, what shape do you see?",
        "Shape in {it}?",
        "Which geometric figure is in {it}?",
        "What type of shape appears in {it}?",
        "Guess the shape in {it}.",
        "What shape does the figure in {it} have?",
        "Which form is shown in {it}?",
        "What shape do you see?",
        "Which shape is it?",
        "Name the shape.",
    ],
    &[
        "Is the shape in {it} round, or does it have corners?",
        "I can't make out the shape in {it}. What is it?",
        "What shape would you say {it} holds?",
        "Out of circle, square and triangle, which one is {it}?",
        "So what's the shape in {it}?",
    ],
];

/// Colour question templates.
pub const COLOUR: [&[&str]; 2] = [
    &[
        "What colour is the shape in {it}?",
        "What color is the shape in {it}?",
        "Which colour is used in {it}?",
        "What colour is the object in {it}?",
        "Name the colour in {it}.",
        "Tell me the colour of the shape in {it}.",
        "What color is the thing in {it}?",
        "Which color does {it} show?",
        "What is the colour of the shape in {it}?",
        "Which colour is the figure in {it}?",
        "What colour is {it}?",
        "What color is {it}?",
        "What is the color of the object in {it}?",
        "Which colour does the shape in {it} have?",
        "Is the shape in {it} red, green, blue or yellow?",
        "Red, green, blue or yellow: which is {it}?",
        "What hue is the shape in {it}?",
        "Which shade is the object in {it}?",
        "What colour has the shape in {it} been painted?",
        "Tell me which colour {it} shows.",
        "Can you tell me the colour in {it}?",
        "Could you name the color of the shape in {it}?",
        "Please tell me the colour of the object in {it}.",
        "Colour of the shape in {it}?",
        "What colour do you see in {it}?",
        "Which colour is the thing drawn in {it}?",
        "Identify the colour of the shape in {it}.",
        "What color is the figure drawn in {it}?",
        "In {it}, what colour is the shape?",
        "Look at {it}: what colour is the shape?",
        "What colour is the shape?",
        "Which color is it?",
    ],
    &[
        "I can't tell the colour of the shape in {it}. Which is it?",
        "What colour would you say {it} is mostly?",
        "Out of red, blue, green and yellow, which colour is {it}?",
        "Which colour dominates {it}?",
        "What's the main colour you notice in {it}?",
    ],
];

/// Image description templates.
pub const DESCRIBE_IMAGE: [&[&str]; 2] = [
    &[
        "Describe {it}.",
        "What is in {it}?",
        "What do you see in {it}?",
        "What does {it} show?",
        "Tell me what is in {it}.",
        "Give a short description of {it}.",
        "What is shown in {it}?",
        "Explain what {it} shows.",
        "What can you see in {it}?",
        "Summarise {it}.",
        "Summarize {it}.",
        "Please describe {it}.",
        "Can you describe {it}?",
        "Describe what you see in {it}.",
        "What is drawn in {it}?",
        "Tell me about {it}.",
        "What does {it} contain?",
        "What is pictured in {it}?",
        "Describe the shape in {it}.",
        "Describe the contents of {it}.",
        "Write a caption for {it}.",
        "What is depicted in {it}?",
        "Briefly describe {it}.",
        "What object is in {it}?",
        "What do you notice in {it}?",
        "How would you describe {it}?",
        "What does {it} look like?",
        "Tell me what you see in {it}.",
        "Say what {it} shows.",
        "Describe the image.",
        "What do you see?",
        "Walk me through {it}.",
        "Break down {it} for me.",
        "Go over {it}.",
        "Give me an overview of {it}.",
        "Explain {it} to me.",
        "Depict {it} in a few words.",
        "What would you call {it}?",
        "Report what {it} shows.",
        "Give me a caption for {it}.",
    ],
    &[
        "What am I looking at in {it}?",
        "Fill me in on {it}.",
        "What's the story with {it}?",
        "Put {it} into words for me.",
        "Give me the short version of what {it} shows.",
    ],
];

/// Two-image templates; `{thing}` is "a triangle" or "a red shape".
pub const COMPARE: [&[&str]; 2] = [
    &[
        "Which image shows {thing}, the first or the second?",
        "Which picture has {thing}, the first or the second?",
        "Is {thing} in the first or the second image?",
        "Where is {thing}: first or second image?",
        "Which of the two images shows {thing}?",
        "Does the first or the second picture show {thing}?",
        "Which one contains {thing}, first or second?",
        "Find {thing}: is it in the first image or the second?",
        "Which image shows {thing}?",
        "Which picture shows {thing}?",
        "Which image contains {thing}?",
        "Which image is {thing} in?",
        "Is {thing} in image one or image two?",
        "First or second: which shows {thing}?",
        "Which image has {thing} in it?",
        "Where do you see {thing}, in the first or the second picture?",
        "Which of the pictures contains {thing}?",
        "Can you tell me which image shows {thing}?",
        "Pick the image with {thing}.",
        "Which photo shows {thing}?",
        "Which of these has {thing}?",
        "Where can I see {thing}?",
        "{thing}: first picture or second?",
        "Do you see {thing} in the first image or in the second one?",
        "Which one of the two photos contains {thing}?",
        "Look at both images. Which one has {thing}?",
        "Between the two pictures, which shows {thing}?",
        "Spot {thing}: image 1 or image 2?",
        "Is there {thing} in the first picture or the second?",
        "One of these images has {thing}. Which one?",
        "Which of the two has {thing}?",
        "Where is {thing}?",
        "Which image has {thing}?",
        "Tell me which picture contains {thing}.",
        "Does {thing} appear in the first or the second photo?",
        "I'm looking for {thing}. Which image?",
        "Which frame shows {thing}?",
        "Which of the images contains {thing}?",
    ],
    &[
        "Out of the two images, which one features {thing}?",
        "Picture number one or picture number two: which has {thing}?",
        "Which of my two uploads has {thing}?",
        "In which picture would I find {thing}?",
    ],
];

/// Beep count templates.
pub const COUNT: [&[&str]; 2] = [
    &[
        "How many beeps are in {it}?",
        "How many beeps does {it} have?",
        "Count the beeps in {it}.",
        "How many times does {it} beep?",
        "How many beeps do you hear in {it}?",
        "What is the number of beeps in {it}?",
        "Tell me how many beeps {it} has.",
        "How many tones are in {it}?",
        "How many sounds are in {it}?",
        "How many tones do you hear in {it}?",
        "Count the tones in {it}.",
        "How many beeps can you count in {it}?",
        "Can you count the beeps in {it}?",
        "What's the number of beeps in {it}?",
        "How many pips are in {it}?",
        "How many times do you hear a beep in {it}?",
        "Please count the beeps in {it}.",
        "How many beeps are there in {it}?",
        "How many bleeps does {it} contain?",
        "How many short tones does {it} have?",
        "How many beeps are there?",
        "Count the beeps.",
        "How often do you hear a beep in {it}?",
        "How frequently does {it} beep?",
        "Beeps in {it}: how many?",
        "How many beeps sound in {it}?",
    ],
    &[
        "How many beeps go off in {it}?",
        "I lost count of the beeps in {it}. How many were there?",
        "What's the beep total in {it}?",
        "How many beeps in total does {it} make?",
    ],
];

/// Pitch templates.
pub const PITCH: [&[&str]; 2] = [
    &[
        "Are the beeps in {it} high or low?",
        "Is {it} high or low?",
        "Is the pitch of {it} high or low?",
        "Are the tones in {it} high or low?",
        "High or low: what pitch is {it}?",
        "What pitch are the beeps in {it}?",
        "Is the sound in {it} high-pitched or low-pitched?",
        "Tell me if {it} is high or low.",
        "Is the pitch high or low in {it}?",
        "Are the tones of {it} high or low?",
        "Is {it} high-pitched or low-pitched?",
        "What is the pitch of {it}?",
        "Tell me the pitch of {it}.",
        "Is the tone in {it} high or low?",
        "Are the sounds in {it} high or low?",
        "Are the beeps in {it} deep or high?",
        "Which pitch does {it} have, high or low?",
        "Please tell me if the beeps in {it} are high or low.",
        "Low or high: what are the beeps in {it}?",
        "How high are the beeps in {it}?",
        "Are the beeps high or low?",
        "What pitch is it?",
    ],
    &[
        "Would you call the beeps in {it} high or low?",
        "Do the beeps in {it} go high or stay low?",
        "On a scale of high to low, where are the beeps in {it}?",
        "Is {it} a high beep or a low beep?",
    ],
];

/// Audio description templates.
pub const DESCRIBE_AUDIO: [&[&str]; 2] = [
    &[
        "Describe {it}.",
        "What do you hear in {it}?",
        "What is in {it}?",
        "Tell me about {it}.",
        "What does {it} sound like?",
        "Describe the beeps in {it}.",
        "Summarise {it}.",
        "What can you hear in {it}?",
        "Please describe {it}.",
        "Can you describe {it}?",
        "What does {it} contain?",
        "Tell me what you hear in {it}.",
        "Describe what you hear in {it}.",
        "What is audible in {it}?",
        "What sounds are in {it}?",
        "Summarize {it}.",
        "Give a short description of {it}.",
        "What plays in {it}?",
        "Describe the sound.",
        "What do you hear?",
        "Walk me through {it}.",
        "Break down {it} for me.",
        "Go over {it}.",
        "Give me an overview of {it}.",
        "Explain what you hear in {it}.",
        "Explain what {it} contains.",
        "What is happening in {it}?",
        "Report what {it} contains.",
        "Give me a rundown of {it}.",
        "What does {it} have in it?",
    ],
    &[
        "What am I hearing in {it}?",
        "Fill me in on {it}.",
        "What's the story with {it}?",
        "Put {it} into words for me.",
    ],
];

/// Document topic templates.
pub const TOPIC: [&[&str]; 2] = [
    &[
        "What is {it} about?",
        "What is the topic of {it}?",
        "Which topic does {it} cover?",
        "What subject is {it} about?",
        "Tell me the topic of {it}.",
        "What does {it} talk about?",
        "Summarise {it} in one word.",
        "What is the subject of {it}?",
        "Which subject does {it} discuss?",
        "What is {it} mainly about?",
        "What topic is {it} about?",
        "Which topic is {it} on?",
        "What is the theme of {it}?",
        "What does {it} discuss?",
        "What is {it} discussing?",
        "Tell me what {it} is about.",
        "What is the main topic of {it}?",
        "Summarise {it}.",
        "Describe {it}.",
        "What is in {it}?",
        "What kind of text is {it}?",
        "What area does {it} cover?",
        "Can you tell me what {it} is about?",
        "Please tell me the topic of {it}.",
        "What field is {it} about?",
        "What is the gist of {it}?",
        "What's the subject of {it}?",
        "What is this document about?",
        "What topic is this?",
        "Walk me through {it}.",
        "Break down {it} for me.",
        "Give me an overview of {it}.",
    ],
    &[
        "What's the main idea of {it}?",
        "Under which heading would you file {it}?",
        "In one word, what does {it} cover?",
        "What's {it} getting at?",
    ],
];

/// Questions no item answers; `{it}` names the row's item when it has one.
pub const UNANSWERABLE: [&[&str]; 2] = [
    &[
        "/help",
        "/start",
        "What time is it?",
        "Who are you?",
        "What is the weather like today?",
        "Tell me a joke.",
        "What is 2 plus 2?",
        "Hello!",
        "What is the capital of France?",
        "How old is the person who made {it}?",
        "Translate {it} into French.",
        "Who made {it}?",
        "What is the price of {it}?",
        "Where was {it} made?",
        "What is your favourite food?",
        "How are you?",
        "Good morning!",
        "Can you help me with my homework?",
        "What is the meaning of life?",
        "Write a story.",
        "Who won the game yesterday?",
        "How do I bake bread?",
        "What will happen tomorrow?",
        "Who painted {it}?",
        "Why was {it} made?",
        "How much does {it} cost?",
        "Is {it} copyrighted?",
        "/clear",
        "/exit",
        "/settings",
        "/new",
        "/undo",
        "What's the date today?",
        "Who wrote {it}?",
        "How old are you?",
        "Where do you live?",
        "Do you like pizza?",
        "Tell me a story about dragons.",
        "What should I eat for dinner?",
        "Recommend a good book.",
        "How do I fix my bike?",
        "Who invented the telephone?",
        "What is the population of Japan?",
        "Compose a limerick.",
        "What do you think about politics?",
        "Can you call my mother?",
        "Set an alarm for seven.",
        "Where is the nearest station?",
        "How tall is Mount Everest?",
        "Which language do you speak?",
        "What did I have for breakfast?",
        "Who took {it}?",
        "When was {it} sent?",
        "Where did {it} come from?",
        "What app made {it}?",
        "Is {it} real or fake?",
        "Who owns {it}?",
        "What year is it?",
        "Are you a robot?",
    ],
    &[
        "/status",
        "/version",
        "How far away is the moon?",
        "Book me a table for two.",
        "Wake me up at six tomorrow.",
        "Which team won the league last season?",
        "When was {it} created?",
        "How big is {it} in megabytes?",
        "Can you email {it} to my boss?",
    ],
];

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
            .filter(|t| !named || if by_words { identifies_kind(t) } else { t.contains("{it}") })
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
    let noun = pick(&nouns, rng);
    surface(&fill(template, noun), style, rng)
}

/// How people actually type: sometimes lower case, sometimes without the
/// final mark, sometimes after a greeting (each style its own greetings).
fn surface(question: &str, style: Style, rng: &mut Rng) -> String {
    let mut q = question.to_string();
    if rng.range(0, 4) == 0 {
        q = q.trim_end_matches(['?', '.', '!']).to_string();
    }
    if rng.range(0, 4) == 0 {
        let mut chars = q.chars();
        q = chars
            .next()
            .map(|c| c.to_ascii_lowercase().to_string() + chars.as_str())
            .unwrap_or_default();
    }
    if rng.range(0, 7) == 0 && !q.starts_with('/') {
        let greetings: &[&str] = match style {
            Style::Unlike => &["Hiya, ", "Yo, ", "Excuse me, "],
            _ => &["Hi! ", "Hey, ", "OK, ", "Quick question: ", "Please: ", "Q: "],
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
        let end = letters.iter().rposition(char::is_ascii_alphabetic).unwrap_or(0);
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
        if crate::rows::GROUPS.iter().any(|g| g.contains(&bare.as_str())) {
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
    "Write", "Compose", "Draw", "Sing", "Tell me", "Make", "Plan", "Find", "Send",
    "Read me", "Create", "Suggest", "Recommend", "Order", "Buy me", "Translate", "Print",
];
const REQUEST_OBJECTS: &[&str] = &[
    "a poem", "a letter to my boss", "an email", "a recipe for soup", "a riddle",
    "a shopping list", "a birthday card", "a workout plan", "a trip to Rome",
    "a bedtime story", "a speech", "some jokes", "a new password", "a name for my dog",
    "a cup of coffee", "a taxi", "flowers for my mum", "the news", "the lottery numbers",
    "a film for tonight", "a podcast", "my horoscope", "a gift idea", "a rap verse",
];
const FACTS: &[&str] = &[
    "population", "height", "age", "price", "length", "speed", "weight", "distance",
    "temperature", "capital", "currency", "language",
];
const THINGS: &[&str] = &[
    "Spain", "the Eiffel Tower", "a banana", "Canada", "the sun", "my car", "the Nile",
    "a cheetah", "Mount Fuji", "Brazil", "an elephant", "Berlin", "the ocean", "Mars",
];
const DEEDS: &[&str] = &[
    "invented", "discovered", "built", "founded", "wrote", "won", "named", "sold",
];
const DEED_OBJECTS: &[&str] = &[
    "the radio", "penicillin", "the pyramids", "Rome", "Hamlet", "the World Cup",
    "the internet", "electricity", "the bicycle", "the last election", "this company",
];
const CHORES: &[&str] = &[
    "tie a tie", "learn French", "change a tyre", "make tea", "reset my router",
    "grow tomatoes", "file my taxes", "get to the beach", "sleep better", "train my dog",
    "cook rice", "write a CV", "unlock my phone", "lower my rent",
];

/// An off-topic request built from parts (varied style, a quarter of the
/// unanswerable rows): the honest reply is then learnt for requests in
/// general, not only for the [`UNANSWERABLE`] templates, and for imperatives
/// ("Write a riddle.", "Draw a taxi.") beside an item as much as for
/// questions. (At half the rows, before the built questions of module
/// `built`, it taught that any unfamiliar words beside an item are off-topic:
/// image descriptions fell from 25 to 16 of 40 on the unlike v2 set.)
fn off_topic(rng: &mut Rng) -> String {
    match rng.range(0, 3) {
        0 => format!("{} {}.", pick(REQUEST_VERBS, rng), pick(REQUEST_OBJECTS, rng)),
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
    "okay", "so", "well", "look", "here", "now", "please", "just", "quick", "thing", "stuff",
    "about", "any", "thoughts", "anything", "say", "something", "details", "info", "check",
    "out", "and", "or", "the", "a", "this", "that", "my", "your", "some", "more", "what",
    "on", "with", "hmm", "right", "again", "see", "know", "want", "need", "get", "make",
    "give", "let", "me", "you", "we", "is", "are", "there", "have", "got", "its", "which",
    "how", "can", "could", "would", "maybe", "really", "exactly", "main", "overall",
    "content", "inside", "whole", "quickly", "summary", "sure", "go", "ahead",
];

/// A made-up word of two or three consonant-vowel syllables ("tomibe").
fn pseudo_word(rng: &mut Rng) -> String {
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
        && matches!(task, Task::ImageDescribe | Task::AudioDescribe | Task::DocumentTopic)
        && rng.range(0, 2) == 0
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
            let question = if asks_vaguely(task, style, rng) {
                vague(Some(Kind::Image), rng)
            } else {
                ask(asked, style, rng)
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
            let question = surface(&capitalise(&template.replace("{thing}", &thing)), style, rng);
            row.messages = user_assistant(with_tokens(&["<image>", "<image>"], &question, rng), answer);
        }
        Task::AudioCount | Task::AudioPitch | Task::AudioDescribe => {
            let (count, pitch) = match task {
                Task::AudioCount => (class + 1, pick(&Pitch::ALL, rng)),
                Task::AudioPitch => (rng.range(1, 4), Pitch::ALL[class]),
                _ => (class % 4 + 1, Pitch::ALL[class / 4]),
            };
            write_audio(dir, &audio_path, count, pitch, rng)?;
            row.speech_audios.push(audio_path);
            let (asked, answer) = audio_question(task, count, pitch);
            let question = if asks_vaguely(task, style, rng) {
                vague(Some(Kind::Audio), rng)
            } else {
                ask(asked, style, rng)
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
            let question = if asks_vaguely(task, style, rng) {
                vague(Some(Kind::Document), rng)
            } else {
                ask(Asked::Topic, style, rng)
            };
            row.messages = user_assistant(
                with_tokens(&["<document>"], &question, rng),
                format!("{}.", capitalise(topic.name())),
            );
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
                        let question = fill(template, pick(IMAGE_NOUNS[lists(style)], rng));
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
                        rng,
                    )?;
                    row.speech_audios.push(audio_path);
                    {
                        let question = fill(template, pick(AUDIO_NOUNS[lists(style)], rng));
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
                        let question = fill(template, pick(DOCUMENT_NOUNS[lists(style)], rng));
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
                        write_audio(dir, &audio_path, count, pitch, rng)?;
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

fn write_audio(dir: &Path, path: &str, count: usize, pitch: Pitch, rng: &mut Rng) -> Result<()> {
    let spec = BeepSpec::random(count, pitch, rng);
    write(
        dir,
        path,
        &audio::wav_bytes(&audio::render(&spec), audio::SAMPLE_RATE),
    )
}

fn audio_question(
    task: Task,
    count: usize,
    pitch: Pitch,
) -> (Asked, String) {
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
        for word in question.to_lowercase().split(|c: char| !c.is_alphanumeric()) {
            assert!(
                !crate::rows::GROUPS.iter().any(|g| g.contains(&word)),
                "{question:?} names {word:?}"
            );
        }
        assert!(!unlike.contains(question), "{question:?} is an unlike question");
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
            let kind = [Some(Kind::Image), Some(Kind::Audio), Some(Kind::Document), None][i % 4];
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
                assert!(!unlike.contains(&question), "{question:?} is an unlike question");
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
            let (a, b): (Vec<&str>, Vec<&str>) = (question.split(' ').collect(), slipped.split(' ').collect());
            assert_eq!(a.len(), b.len());
            let diff: Vec<usize> = (0..a.len()).filter(|&i| a[i] != b[i]).collect();
            assert_eq!(diff.len(), 1, "{slipped}");
            let (old, new) = (a[diff[0]], b[diff[0]]);
            assert!(old.len() >= 4 && new.chars().next() == old.chars().next(), "{slipped}");
            assert_eq!(old.ends_with('?'), new.ends_with('?'), "{slipped}");
            changed.insert(old.to_string());
        }
        // "What", "shape" and "picture?" all get their turn; "is", "in", "the" never.
        assert_eq!(changed.len(), 3, "{changed:?}");
        assert_eq!(typo("Is it in?", &mut rng), "Is it in?");
    }
}
