//! Tasks, rows in multi_token's JSONL schema, the split writer and the answer judge.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::audio::{self, BeepSpec, Pitch};
use crate::documents::{self, Topic};
use crate::images::{self, Colour, Shape, ShapeSpec};
use crate::{io_error, Error, Result, Rng};

/// One kind of question.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Task {
    /// `<image> What shape is this?` -> `A circle.`
    ImageShape,
    /// `<image> What colour is the shape?` -> `Red.`
    ImageColour,
    /// `<image> Describe the image.` -> `A red circle.`
    ImageDescribe,
    /// `<image> <image> Which image shows a triangle, ...?` -> `First image: a blue square. A triangle? No. Second image: a red triangle. A triangle? Yes. So the second image shows a triangle.`
    ImageCompare,
    /// `<speech> How many beeps are there?` -> `Three beeps.`
    AudioCount,
    /// `<speech> Are the beeps high or low?` -> `High.`
    AudioPitch,
    /// `<speech> Describe the sound.` -> `Three high beeps.`
    AudioDescribe,
    /// `<document> What is this document about?` -> `Cooking.`
    DocumentTopic,
    /// Non-classic styles only: a question no item answers (`/help`, `What
    /// time is it?`), with or without an item -> [`UNSURE`].
    Unanswerable,
    /// Non-classic styles only: a chat of two or three turns that switches
    /// between an image, a clip and a document; judged on the last answer.
    MultiTurn,
}

/// The reply to a question the model cannot answer.
pub const UNSURE: &str = "I can't tell from this.";

/// The look of the data: phrasings, image style and extra tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Style {
    /// The original generator, byte for byte: a few phrasings per task,
    /// square images with one shape on a plain light background.
    #[default]
    Classic,
    /// Hundreds of phrasings per task (many naming the item: "the picture",
    /// "the clip", "the document"...), images of aspect 1:4 to 4:1 with small
    /// to large shapes anywhere, a little tilted or stretched, in many shades,
    /// on seventeen kinds of background (plain, tinted, noisy, checkered,
    /// blotchy, vignetted, ruled, mid-grey, graded, dark, speckled, striped,
    /// cloudy, camouflaged, newsprint, bokeh),
    /// plus the [`Task::Unanswerable`] and [`Task::MultiTurn`] tasks (chats
    /// that switch items or attach several at once, and pick an item by its
    /// noun or by what is asked). A quarter of the classic tasks' rows are
    /// classic rows. For training.
    Varied,
    /// A test style sharing no phrasing, item noun or background with
    /// `Varied` or `Classic` (since v9: woven tartan, hexagonal tiles,
    /// herringbone parquet and pencil-hatching backgrounds), for measuring how
    /// a model trained on `Varied` generalises.
    Unlike,
}

impl Style {
    /// `classic`, `varied` or `unlike`.
    pub fn name(self) -> &'static str {
        match self {
            Style::Classic => "classic",
            Style::Varied => "varied",
            Style::Unlike => "unlike",
        }
    }

    /// Parses [`Style::name`].
    pub fn from_name(name: &str) -> Option<Style> {
        [Style::Classic, Style::Varied, Style::Unlike]
            .into_iter()
            .find(|s| s.name() == name)
    }
}

impl Task {
    /// Every task.
    pub const ALL: [Task; 8] = [
        Task::ImageShape,
        Task::ImageColour,
        Task::ImageDescribe,
        Task::ImageCompare,
        Task::AudioCount,
        Task::AudioPitch,
        Task::AudioDescribe,
        Task::DocumentTopic,
    ];

    /// Short name used in row ids (`image_shape`).
    pub fn name(self) -> &'static str {
        match self {
            Task::ImageShape => "image_shape",
            Task::ImageColour => "image_colour",
            Task::ImageDescribe => "image_describe",
            Task::ImageCompare => "image_compare",
            Task::AudioCount => "audio_count",
            Task::AudioPitch => "audio_pitch",
            Task::AudioDescribe => "audio_describe",
            Task::DocumentTopic => "document_topic",
            Task::Unanswerable => "unanswerable",
            Task::MultiTurn => "multi_turn",
        }
    }

    /// The tasks only the varied and unlike styles add (not in [`Task::ALL`],
    /// so the classic output stays as it was).
    pub const EXTRA: [Task; 2] = [Task::Unanswerable, Task::MultiTurn];

    /// Parses [`Task::name`] (of [`Task::ALL`] and [`Task::EXTRA`]).
    pub fn from_name(name: &str) -> Option<Task> {
        Task::ALL
            .into_iter()
            .chain(Task::EXTRA)
            .find(|t| t.name() == name)
    }

    /// Number of answer classes samples cycle through (balanced counts).
    pub fn classes(self) -> usize {
        match self {
            Task::ImageShape => 3,
            Task::ImageColour => 4,
            Task::ImageDescribe => 12,
            Task::ImageCompare => 2,
            Task::AudioCount => 4,
            Task::AudioPitch => 2,
            Task::AudioDescribe => 8,
            Task::DocumentTopic => 6,
            Task::Unanswerable => 1,
            Task::MultiTurn => 6,
        }
    }

    fn index(self) -> u64 {
        Task::ALL
            .iter()
            .chain(Task::EXTRA.iter())
            .position(|t| *t == self)
            .unwrap_or(0) as u64
    }
}

/// Train or held-out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    /// The training split.
    Train,
    /// The held-out split (a different random stream of the same seed).
    Heldout,
}

impl Split {
    /// `train` or `heldout` (the JSONL file stem and the files' folder).
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Heldout => "heldout",
        }
    }

    fn stream(self) -> u64 {
        match self {
            Split::Train => 1,
            Split::Heldout => 2,
        }
    }
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// `user` or `assistant`.
    pub role: String,
    /// The text, with modality tokens where items go.
    pub content: String,
}

/// One dataset row (multi_token's schema; empty item lists are left out).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Row {
    /// Unique id, `{split}-{task}-{index}`.
    pub id: String,
    /// Image paths relative to the JSONL file.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub images: Vec<String>,
    /// WAV paths relative to the JSONL file.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub speech_audios: Vec<String>,
    /// Document paths relative to the JSONL file.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub documents: Vec<String>,
    /// A user question and the assistant's reference answer.
    pub messages: Vec<Message>,
}

impl Row {
    /// The user's question.
    pub fn question(&self) -> &str {
        self.messages
            .first()
            .map(|m| m.content.as_str())
            .unwrap_or("")
    }

    /// The reference answer (of the first turn).
    pub fn answer(&self) -> &str {
        self.messages
            .get(1)
            .map(|m| m.content.as_str())
            .unwrap_or("")
    }

    /// The last reference answer: what a multi-turn row is judged on.
    pub fn last_answer(&self) -> &str {
        self.messages
            .last()
            .map(|m| m.content.as_str())
            .unwrap_or("")
    }

    /// Every message before the last answer: the chat a model is given.
    pub fn prompt(&self) -> &[Message] {
        &self.messages[..self.messages.len().saturating_sub(1)]
    }
}

/// What to generate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerateConfig {
    /// Seed of every random choice.
    pub seed: u64,
    /// Training rows per task.
    pub train_per_task: usize,
    /// Held-out rows per task.
    pub heldout_per_task: usize,
    /// The tasks (default: all).
    pub tasks: Vec<Task>,
    /// Tasks whose training split has this many times `train_per_task` rows
    /// (default: none); the held-out split keeps `heldout_per_task` of each.
    pub train_weights: Vec<(Task, usize)>,
    /// Phrasings, image style and extra tasks (default: [`Style::Classic`],
    /// the original output byte for byte). Non-classic styles add
    /// [`Task::EXTRA`] to the tasks.
    pub style: Style,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            train_per_task: 600,
            heldout_per_task: 60,
            tasks: Task::ALL.to_vec(),
            train_weights: Vec::new(),
            style: Style::Classic,
        }
    }
}

/// What [`generate`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// `train.jsonl`.
    pub train_file: PathBuf,
    /// `heldout.jsonl`.
    pub heldout_file: PathBuf,
    /// Rows in the training split.
    pub train_rows: usize,
    /// Rows in the held-out split.
    pub heldout_rows: usize,
}

/// Writes both splits under `dir` (created if missing).
pub fn generate(dir: &Path, config: &GenerateConfig) -> Result<Summary> {
    let train = generate_split(dir, Split::Train, config.train_per_task, config)?;
    let heldout = generate_split(dir, Split::Heldout, config.heldout_per_task, config)?;
    Ok(Summary {
        train_file: dir.join("train.jsonl"),
        heldout_file: dir.join("heldout.jsonl"),
        train_rows: train.len(),
        heldout_rows: heldout.len(),
    })
}

/// Writes `{dir}/{split}.jsonl` with `per_task` rows of every task of `config`
/// (times its `train_weights` entry in the training split) and their files under `{dir}/{split}/`; returns the rows in file order.
pub fn generate_split(
    dir: &Path,
    split: Split,
    per_task: usize,
    config: &GenerateConfig,
) -> Result<Vec<Row>> {
    if config.tasks.is_empty() {
        return Err(Error::Config("no tasks selected".to_string()));
    }
    let mut tasks: BTreeSet<Task> = config.tasks.iter().copied().collect();
    if config.style != Style::Classic {
        tasks.extend(Task::EXTRA);
    }
    let files = dir.join(split.name());
    for sub in ["images", "audio", "documents"] {
        let path = files.join(sub);
        std::fs::create_dir_all(&path).map_err(|e| io_error(&path, e))?;
    }
    let split_rng = Rng::new(config.seed).fork(split.stream());
    let mut rows = Vec::with_capacity(per_task * tasks.len());
    for task in tasks {
        let task_rng = split_rng.fork(100 + task.index());
        let weight = match split {
            Split::Train => config
                .train_weights
                .iter()
                .find(|(t, _)| *t == task)
                .map_or(1, |(_, w)| *w),
            Split::Heldout => 1,
        };
        for i in 0..per_task * weight {
            let mut rng = task_rng.fork(i as u64);
            // A quarter of the varied style's rows of the classic tasks are
            // classic rows, so a model trained on it keeps the classic
            // phrasings and images too.
            let classic = config.style == Style::Classic
                || (config.style == Style::Varied
                    && Task::ALL.contains(&task)
                    && task_rng.fork(1_000_000 + i as u64).range(0, 3) == 0);
            rows.push(if classic {
                make_row(dir, split, task, i, &mut rng)?
            } else {
                crate::varied::make_row(dir, split, task, i, config.style, &mut rng)?
            });
        }
    }
    // Interleave tasks deterministically (Fisher-Yates).
    let mut order_rng = split_rng.fork(7);
    for i in (1..rows.len()).rev() {
        let j = order_rng.range(0, i);
        rows.swap(i, j);
    }
    let mut text = String::new();
    for row in &rows {
        let line = serde_json::to_string(row)
            .map_err(|e| Error::Config(format!("row {}: {e}", row.id)))?;
        text.push_str(&line);
        text.push('\n');
    }
    let jsonl = dir.join(format!("{}.jsonl", split.name()));
    std::fs::write(&jsonl, text).map_err(|e| io_error(&jsonl, e))?;
    Ok(rows)
}

pub(crate) fn write(dir: &Path, relative: &str, bytes: &[u8]) -> Result<()> {
    let path = dir.join(relative);
    std::fs::write(&path, bytes).map_err(|e| io_error(&path, e))
}

fn write_image(dir: &Path, relative: &str, spec: &ShapeSpec, rng: &mut Rng) -> Result<()> {
    let image = images::render(spec, rng);
    let bytes = images::png_bytes(&image).map_err(|message| Error::Image {
        path: dir.join(relative),
        message,
    })?;
    write(dir, relative, &bytes)
}

/// The two images of a two-image row: different shapes (`by_shape`) or
/// different colours, the other attribute drawn freely. The draws are in the
/// order the classic generator always made them.
pub(crate) fn compare_pair(by_shape: bool, rng: &mut Rng) -> ((Shape, Colour), (Shape, Colour)) {
    if by_shape {
        let first = pick(&Shape::ALL, rng);
        let second = pick_other(&Shape::ALL, first, rng);
        let colours = (pick(&Colour::ALL, rng), pick(&Colour::ALL, rng));
        ((first, colours.0), (second, colours.1))
    } else {
        let first = pick(&Colour::ALL, rng);
        let second = pick_other(&Colour::ALL, first, rng);
        let shapes = (pick(&Shape::ALL, rng), pick(&Shape::ALL, rng));
        ((shapes.0, first), (shapes.1, second))
    }
}

/// What a two-image row asks for ("a triangle", "a red shape") and its
/// checked answer, for images `a` and `b` with the target in the second when
/// `target_second`.
// The answer checks each image before its verdict. The tiny demo
// LM cannot match a question's word against image features
// directly (measured: at chance with 36 positions per image and
// with one pooled position), nor against its own two descriptions
// at the end (descriptions right, verdict at chance), nor with a
// bare yes/no after each description (65%). Here each check
// repeats what is asked right before its yes or no, so the
// comparison is between neighbouring words, and the verdict names
// the image whose check said yes.
pub(crate) fn compare_answer(
    a: (Shape, Colour),
    b: (Shape, Colour),
    by_shape: bool,
    target_second: bool,
) -> (String, String) {
    let target = if target_second { b } else { a };
    let thing = if by_shape {
        format!("a {}", target.0.name())
    } else {
        format!("a {} shape", target.1.name())
    };
    let which = if target_second { "second" } else { "first" };
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
    let answer = format!(
        "First image: {}. Second image: {}. So the {which} image shows {thing}.",
        check(a),
        check(b)
    );
    (thing, answer)
}

pub(crate) fn pick<T: Copy>(items: &[T], rng: &mut Rng) -> T {
    items[rng.range(0, items.len() - 1)]
}

/// A value of `items` other than `not`, drawn as [`pick`] draws.
pub(crate) fn pick_other<T: Copy + PartialEq>(items: &[T], not: T, rng: &mut Rng) -> T {
    let others: Vec<T> = items.iter().copied().filter(|v| *v != not).collect();
    pick(&others, rng)
}

pub(crate) fn capitalise(text: &str) -> String {
    let mut chars = text.chars();
    chars
        .next()
        .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
        .unwrap_or_default()
}

/// `text` with its first letter in lower case (as people type after a comma,
/// or without bothering).
pub(crate) fn lower_first(text: &str) -> String {
    let mut chars = text.chars();
    chars
        .next()
        .map(|c| c.to_ascii_lowercase().to_string() + chars.as_str())
        .unwrap_or_default()
}

pub(crate) fn user_assistant(question: String, answer: String) -> Vec<Message> {
    vec![
        Message {
            role: "user".to_string(),
            content: question,
        },
        Message {
            role: "assistant".to_string(),
            content: answer,
        },
    ]
}

fn make_row(dir: &Path, split: Split, task: Task, i: usize, rng: &mut Rng) -> Result<Row> {
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
    match task {
        Task::ImageShape | Task::ImageColour | Task::ImageDescribe => {
            let (shape, colour) = match task {
                Task::ImageShape => (Shape::ALL[class], pick(&Colour::ALL, rng)),
                Task::ImageColour => (pick(&Shape::ALL, rng), Colour::ALL[class]),
                _ => (Shape::ALL[class % 3], Colour::ALL[class / 3]),
            };
            let spec = ShapeSpec::random(shape, colour, rng);
            let path = format!("{base}images/{id}.png");
            write_image(dir, &path, &spec, rng)?;
            row.images.push(path);
            let (question, answer) = match task {
                Task::ImageShape => (
                    pick(
                        &[
                            "What shape is this?",
                            "What shape is in the image?",
                            "Which shape do you see?",
                            "Name the shape.",
                        ],
                        rng,
                    ),
                    format!("A {}.", shape.name()),
                ),
                Task::ImageColour => (
                    pick(
                        &[
                            "What colour is the shape?",
                            "What color is the shape?",
                            "Which colour is it?",
                        ],
                        rng,
                    ),
                    format!("{}.", capitalise(colour.name())),
                ),
                _ => (
                    pick(
                        &[
                            "Describe the image.",
                            "What is in the image?",
                            "What do you see?",
                        ],
                        rng,
                    ),
                    format!("A {} {}.", colour.name(), shape.name()),
                ),
            };
            row.messages = user_assistant(format!("<image> {question}"), answer);
        }
        Task::ImageCompare => {
            let target_second = class == 1;
            let by_shape = rng.range(0, 1) == 0;
            let (a, b) = compare_pair(by_shape, rng);
            for (suffix, (shape, colour)) in [("a", a), ("b", b)] {
                let spec = ShapeSpec::random(shape, colour, rng);
                let path = format!("{base}images/{id}-{suffix}.png");
                write_image(dir, &path, &spec, rng)?;
                row.images.push(path);
            }
            let (thing, answer) = compare_answer(a, b, by_shape, target_second);
            row.messages = user_assistant(
                format!("<image> <image> Which image shows {thing}, the first or the second?"),
                answer,
            );
        }
        Task::AudioCount | Task::AudioPitch | Task::AudioDescribe => {
            let (count, pitch) = match task {
                Task::AudioCount => (class + 1, pick(&Pitch::ALL, rng)),
                Task::AudioPitch => (rng.range(1, 4), Pitch::ALL[class]),
                _ => (class % 4 + 1, Pitch::ALL[class / 4]),
            };
            let spec = BeepSpec::random(count, pitch, rng);
            let path = format!("{base}audio/{id}.wav");
            write(
                dir,
                &path,
                &audio::wav_bytes(&audio::render(&spec), audio::SAMPLE_RATE),
            )?;
            row.speech_audios.push(path);
            let plural = if count == 1 { "beep" } else { "beeps" };
            let (question, answer) = match task {
                Task::AudioCount => (
                    pick(
                        &[
                            "How many beeps are there?",
                            "How many beeps do you hear?",
                            "Count the beeps.",
                        ],
                        rng,
                    ),
                    format!("{} {plural}.", audio::count_word(count, true)),
                ),
                Task::AudioPitch => (
                    pick(
                        &[
                            "Are the beeps high or low?",
                            "Is the pitch high or low?",
                            "Is the sound high or low?",
                        ],
                        rng,
                    ),
                    format!("{}.", capitalise(pitch.name())),
                ),
                _ => (
                    pick(&["Describe the sound.", "What do you hear?"], rng),
                    format!(
                        "{} {} {plural}.",
                        audio::count_word(count, true),
                        pitch.name()
                    ),
                ),
            };
            row.messages = user_assistant(format!("<speech> {question}"), answer);
        }
        Task::Unanswerable | Task::MultiTurn => {
            return crate::varied::make_row(dir, split, task, i, Style::Varied, rng);
        }
        Task::DocumentTopic => {
            let topic = Topic::ALL[class];
            let path = format!("{base}documents/{id}.txt");
            write(dir, &path, documents::render(topic, rng).as_bytes())?;
            row.documents.push(path);
            let question = pick(
                &[
                    "What is this document about?",
                    "What is the topic of this document?",
                    "Which topic does the document cover?",
                ],
                rng,
            );
            row.messages = user_assistant(
                format!("<document> {question}"),
                format!("{}.", capitalise(topic.name())),
            );
        }
    }
    Ok(row)
}

/// Word groups an answer is judged on.
pub(crate) const GROUPS: [&[&str]; 6] = [
    &["circle", "square", "triangle"],
    &["red", "green", "blue", "yellow"],
    &["one", "two", "three", "four"],
    &["high", "low"],
    &[
        "cooking",
        "football",
        "weather",
        "space",
        "music",
        "gardening",
    ],
    &["first", "second"],
];

/// The words of `text`, lower-cased, in order.
fn words(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_lowercase)
        .collect()
}

/// Whether `generated` names exactly what `reference` names, in the same
/// order: the words of every group (shapes, colours, counts, pitches, topics,
/// first/second) that the reference uses are picked out of both texts, and the
/// two sequences must be equal — so a two-image answer ("First image: a blue
/// square. A triangle? No. Second image: a red triangle. A triangle? Yes. So
/// the second …") is right
/// only when each image is described as itself and the verdict is the
/// reference's. Groups the
/// reference does not use are not judged. A reference that is the honest
/// reply [`UNSURE`] matches an answer that says it can't tell and names none
/// of the groups' words; a reference that ends on "Yes" or "No" (a yes/no
/// question's) needs an answer ending on the same verdict; any other
/// reference naming nothing is never matched.
pub fn judge(reference: &str, generated: &str) -> bool {
    if words(reference) == words(UNSURE) {
        let generated = words(generated);
        let says_unsure = generated
            .windows(2)
            .any(|w| (w[0] == "t" || w[0] == "cannot") && w[1] == "tell");
        let names_something = generated
            .iter()
            .any(|w| GROUPS.iter().any(|group| group.contains(&w.as_str())));
        return says_unsure && !names_something;
    }
    let reference = words(reference);
    let generated = words(generated);
    // A yes/no answer ("A square. A circle? No.", or the bare "Yes" after the
    // short-answer instruction) must end on the same verdict; what it names
    // before is judged as any answer is.
    let verdict = |text: &[String]| text.last().filter(|w| *w == "yes" || *w == "no").cloned();
    if let Some(want) = verdict(&reference) {
        if verdict(&generated) != Some(want) {
            return false;
        }
        if reference.len() == 1 {
            return true;
        }
    }
    let used: Vec<&[&str]> = GROUPS
        .iter()
        .copied()
        .filter(|group| reference.iter().any(|w| group.contains(&w.as_str())))
        .collect();
    let named = |text: &[String]| -> Vec<String> {
        text.iter()
            .filter(|w| used.iter().any(|group| group.contains(&w.as_str())))
            .cloned()
            .collect()
    };
    let want = named(&reference);
    !want.is_empty() && named(&generated) == want
}
