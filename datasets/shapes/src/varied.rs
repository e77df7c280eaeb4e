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
use crate::documents::{self, Topic};
use crate::images::{self, Colour, Shape, ShapeSpec};
use crate::rows::{
    capitalise, pick, user_assistant, write, Message, Row, Split, Style, Task, UNSURE,
};
use crate::{Error, Result, Rng};

/// Noun phrases for an image, per style.
pub const IMAGE_NOUNS: [&[&str]; 2] = [
    &[
        "this",
        "the image",
        "this image",
        "the picture",
        "this picture",
        "the photo",
        "this photo",
    ],
    &[
        "the pic",
        "this graphic",
        "the illustration",
        "this snapshot",
        "the drawing",
    ],
];

/// Noun phrases for an audio clip, per style.
pub const AUDIO_NOUNS: [&[&str]; 2] = [
    &[
        "this",
        "the clip",
        "this clip",
        "the recording",
        "this recording",
        "the audio",
        "the sound",
    ],
    &[
        "this sound file",
        "the track",
        "the sample",
        "this audio snippet",
    ],
];

/// Noun phrases for a document, per style.
pub const DOCUMENT_NOUNS: [&[&str]; 2] = [
    &[
        "this",
        "the document",
        "this document",
        "the file",
        "this file",
        "the text",
    ],
    &["this page", "the article", "the note", "the writing"],
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
    ],
    &[
        "Can you tell what shape {it} contains?",
        "Which geometric form is drawn in {it}?",
        "I'd like to know the shape in {it}.",
        "what's the shape in {it}",
        "Shape of the object in {it}?",
        "Could you name the figure in {it}?",
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
    ],
    &[
        "What's the hue of the shape in {it}?",
        "Could you tell me what color {it} uses for the shape?",
        "colour of the object in {it}?",
        "Which paint colour fills the shape in {it}?",
        "I wonder what colour the shape in {it} is.",
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
    ],
    &[
        "What's going on in {it}?",
        "Could you describe {it} for me?",
        "describe {it} briefly",
        "What does {it} depict?",
        "Caption {it}.",
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
    ],
    &[
        "Out of these two pictures, which has {thing}?",
        "In which of the two snapshots can I find {thing}?",
        "Tell me whether {thing} is in picture one or picture two.",
        "which drawing has {thing}",
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
    ],
    &[
        "what's the beep count of {it}",
        "Could you count how many beeps play in {it}?",
        "Number of beeps in {it}?",
        "How often does {it} beep?",
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
    ],
    &[
        "Would you say {it} sounds high or low?",
        "pitch of {it}: high or low?",
        "Do the beeps in {it} sound high or deep?",
        "Is {it} a high or a low tone?",
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
    ],
    &[
        "Give me a description of {it}.",
        "what's in {it}",
        "Could you describe what {it} contains?",
        "Explain {it} to me.",
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
    ],
    &[
        "What's {it} on about?",
        "Could you say which subject {it} deals with?",
        "topic of {it}?",
        "Give me the theme of {it}.",
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
    ],
    &[
        "/reset",
        "/quit",
        "what day is it",
        "Can you write me a poem?",
        "Who is the president?",
        "How far away is the moon?",
        "Why is {it} here?",
        "When was {it} created?",
        "Sing a song.",
        "What's your name?",
    ],
];

/// The kinds of item a multi-turn chat switches between.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Image,
    Audio,
    Document,
}

fn lists(style: Style) -> usize {
    usize::from(style == Style::Unlike)
}

fn fill(template: &str, it: &str) -> String {
    capitalise(&template.replace("{it}", it))
}

/// A question from `templates` about an item of `kind` in `style`.
fn ask(templates: [&[&str]; 2], kind: Kind, style: Style, rng: &mut Rng) -> String {
    let nouns = match kind {
        Kind::Image => IMAGE_NOUNS,
        Kind::Audio => AUDIO_NOUNS,
        Kind::Document => DOCUMENT_NOUNS,
    };
    let template = pick(templates[lists(style)], rng);
    let noun = pick(nouns[lists(style)], rng);
    fill(template, noun)
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
            let (templates, answer) = match task {
                Task::ImageShape => (SHAPE, format!("A {}.", shape.name())),
                Task::ImageColour => (COLOUR, format!("{}.", capitalise(colour.name()))),
                _ => (
                    DESCRIBE_IMAGE,
                    format!("A {} {}.", colour.name(), shape.name()),
                ),
            };
            let question = ask(templates, Kind::Image, style, rng);
            row.messages = user_assistant(format!("<image> {question}"), answer);
        }
        Task::ImageCompare => {
            let target_second = class == 1;
            let by_shape = rng.range(0, 1) == 0;
            let (a, b) = if by_shape {
                let first = pick(&Shape::ALL, rng);
                let others: Vec<Shape> = Shape::ALL.into_iter().filter(|s| *s != first).collect();
                let second = pick(&others, rng);
                (
                    (first, pick(&Colour::ALL, rng)),
                    (second, pick(&Colour::ALL, rng)),
                )
            } else {
                let first = pick(&Colour::ALL, rng);
                let others: Vec<Colour> = Colour::ALL.into_iter().filter(|c| *c != first).collect();
                let second = pick(&others, rng);
                (
                    (pick(&Shape::ALL, rng), first),
                    (pick(&Shape::ALL, rng), second),
                )
            };
            for (suffix, (shape, colour)) in [("a", a), ("b", b)] {
                let path = format!("{base}images/{id}-{suffix}.png");
                image_item(dir, &path, shape, colour, style, rng)?;
                row.images.push(path);
            }
            let target = if target_second { b } else { a };
            let thing = if by_shape {
                format!("a {}", target.0.name())
            } else {
                format!("a {} shape", target.1.name())
            };
            let which = if target_second { "second" } else { "first" };
            // The same checked answer as the classic style (see rows.rs).
            let check = |(shape, colour): (Shape, Colour)| {
                let fits = if by_shape {
                    shape == target.0
                } else {
                    colour == target.1
                };
                format!(
                    "a {} {}. {}? {}",
                    colour.name(),
                    shape.name(),
                    capitalise(&thing),
                    if fits { "Yes" } else { "No" }
                )
            };
            let template = pick(COMPARE[lists(style)], rng);
            let question = capitalise(&template.replace("{thing}", &thing));
            row.messages = user_assistant(
                format!("<image> <image> {question}"),
                format!(
                    "First image: {}. Second image: {}. So the {which} image shows {thing}.",
                    check(a),
                    check(b)
                ),
            );
        }
        Task::AudioCount | Task::AudioPitch | Task::AudioDescribe => {
            let (count, pitch) = match task {
                Task::AudioCount => (class + 1, pick(&Pitch::ALL, rng)),
                Task::AudioPitch => (rng.range(1, 4), Pitch::ALL[class]),
                _ => (class % 4 + 1, Pitch::ALL[class / 4]),
            };
            write_audio(dir, &audio_path, count, pitch, rng)?;
            row.speech_audios.push(audio_path);
            let (templates, answer) = audio_question(task, count, pitch);
            let question = ask(templates, Kind::Audio, style, rng);
            row.messages = user_assistant(format!("<speech> {question}"), answer);
        }
        Task::DocumentTopic => {
            let topic = Topic::ALL[class];
            write(
                dir,
                &document_path,
                documents::render(topic, rng).as_bytes(),
            )?;
            row.documents.push(document_path);
            let question = ask(TOPIC, Kind::Document, style, rng);
            row.messages = user_assistant(
                format!("<document> {question}"),
                format!("{}.", capitalise(topic.name())),
            );
        }
        Task::Unanswerable => {
            let template = pick(UNANSWERABLE[lists(style)], rng);
            // With no item, only the templates that do not name one.
            let kind = if template.contains("{it}") {
                rng.range(0, 2)
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
                    format!(
                        "<image> {}",
                        fill(template, pick(IMAGE_NOUNS[lists(style)], rng))
                    )
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
                    format!(
                        "<speech> {}",
                        fill(template, pick(AUDIO_NOUNS[lists(style)], rng))
                    )
                }
                2 => {
                    write(
                        dir,
                        &document_path,
                        documents::render(pick(&Topic::ALL, rng), rng).as_bytes(),
                    )?;
                    row.documents.push(document_path);
                    format!(
                        "<document> {}",
                        fill(template, pick(DOCUMENT_NOUNS[lists(style)], rng))
                    )
                }
                _ => template.to_string(),
            };
            row.messages = user_assistant(question, UNSURE.to_string());
        }
        Task::MultiTurn => {
            // `class` picks the ordered pair of kinds (6 pairs); a third turn
            // goes back to the first item half the time.
            const PAIRS: [(Kind, Kind); 6] = [
                (Kind::Image, Kind::Audio),
                (Kind::Image, Kind::Document),
                (Kind::Audio, Kind::Image),
                (Kind::Audio, Kind::Document),
                (Kind::Document, Kind::Image),
                (Kind::Document, Kind::Audio),
            ];
            let (first, second) = PAIRS[class];
            let mut messages = Vec::new();
            let mut turns = vec![first, second];
            if rng.range(0, 1) == 1 {
                turns.push(first);
            }
            // The items, drawn once each.
            let shape = pick(&Shape::ALL, rng);
            let colour = pick(&Colour::ALL, rng);
            let count = rng.range(1, 4);
            let pitch = pick(&Pitch::ALL, rng);
            let topic = pick(&Topic::ALL, rng);
            for kind in [first, second] {
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
            for (n, kind) in turns.iter().enumerate() {
                // The item's token goes with the first question about it.
                let token = if n < 2 {
                    match kind {
                        Kind::Image => "<image> ",
                        Kind::Audio => "<speech> ",
                        Kind::Document => "<document> ",
                    }
                } else {
                    ""
                };
                let (question, answer) = match kind {
                    Kind::Image => match rng.range(0, 2) {
                        0 => (
                            ask(SHAPE, *kind, style, rng),
                            format!("A {}.", shape.name()),
                        ),
                        1 => (
                            ask(COLOUR, *kind, style, rng),
                            format!("{}.", capitalise(colour.name())),
                        ),
                        _ => (
                            ask(DESCRIBE_IMAGE, *kind, style, rng),
                            format!("A {} {}.", colour.name(), shape.name()),
                        ),
                    },
                    Kind::Audio => {
                        let task = [Task::AudioCount, Task::AudioPitch, Task::AudioDescribe]
                            [rng.range(0, 2)];
                        let (templates, answer) = audio_question(task, count, pitch);
                        (ask(templates, *kind, style, rng), answer)
                    }
                    Kind::Document => (
                        ask(TOPIC, *kind, style, rng),
                        format!("{}.", capitalise(topic.name())),
                    ),
                };
                messages.push(turn("user", format!("{token}{question}")));
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
) -> ([&'static [&'static str]; 2], String) {
    let plural = if count == 1 { "beep" } else { "beeps" };
    match task {
        Task::AudioCount => (
            COUNT,
            format!("{} {plural}.", audio::count_word(count, true)),
        ),
        Task::AudioPitch => (PITCH, format!("{}.", capitalise(pitch.name()))),
        _ => (
            DESCRIBE_AUDIO,
            format!(
                "{} {} {plural}.",
                audio::count_word(count, true),
                pitch.name()
            ),
        ),
    }
}
