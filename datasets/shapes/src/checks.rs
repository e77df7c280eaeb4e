//! Yes/no questions (the varied style, a sixth of its single-item rows): "Is
//! the shape in the picture a circle?" -> "A square. A circle? No.", "Are the
//! beeps in the clip high?" -> "High. High? Yes.", "Is the text about
//! cooking?" -> "Space. Cooking? No.".
//!
//! Why: every other question names no answer word, so a question that does
//! ("Is that a circle or something else?", "Is the thing round, square or
//! triangular?", POPE's "Is there a red circle in the image?") was unlike
//! anything in training and got "I can't tell from this.". Here half the
//! named values are wrong, so the model learns to check the item rather than
//! echo the question. The answer says what is there first, then repeats what
//! was asked right before its verdict, as the two-image answers do: with the
//! verdict first ("No. A square."), the demo LM got 70% of the verdicts right
//! on its held-out rows, since it had to compare the question's word with the
//! item's features directly; here it compares neighbouring words. A third of
//! the questions end with LLaVA-1.5's short-answer instruction
//! ([`SHORT_ANSWER`]) and are answered with the bare word, as LLaVA's VQA rows
//! are (and as POPE's scoring wants).

use crate::audio::{count_word, Pitch};
use crate::built::{Asked, ItemKind as Kind};
use crate::documents::Topic;
use crate::images::{Colour, Shape};
use crate::rows::{capitalise, pick, pick_other};
use crate::varied::{AUDIO_NOUNS, DOCUMENT_NOUNS, IMAGE_NOUNS};
use crate::Rng;

/// LLaVA-1.5's instruction for a one-word answer (lmms-eval appends it to
/// POPE's questions).
pub const SHORT_ANSWER: &str = "Answer the question using a single word or phrase.";

/// Templates per asked value: `{it}` is the item's noun, `{x}` the value
/// checked ("a circle", "red", "a red circle", "three beeps", "high",
/// "cooking").
const SHAPE: &[&str] = &[
    "Is it {x}?",
    "Is this {x}?",
    "Is that {x}?",
    "Is the shape in {it} {x}?",
    "Is there {x} in {it}?",
    "Does {it} show {x}?",
    "Do you see {x} in {it}?",
    "Is the object in {it} {x}?",
    "Is the figure in {it} {x}?",
    "Does {it} contain {x}?",
    "Can you see {x} in {it}?",
    "Would you say {it} shows {x}?",
    "Is {x} drawn in {it}?",
    "Is {it} a picture of {x}?",
    "Is the thing in {it} {x} or something else?",
    "Am I right that {it} has {x}?",
    "Is the shape {x}?",
    "Is there {x}?",
];

/// Shape templates whose `{x}` is an adjective ("round", "triangular").
const SHAPE_ADJECTIVE: &[&str] = &[
    "Is the shape in {it} {x}?",
    "Is it {x}?",
    "Is the object in {it} {x}?",
    "Is the thing in {it} {x}?",
    "Does {it} show something {x}?",
    "Is the figure {x}?",
    "Is what you see in {it} {x}?",
    "Would you call the shape in {it} {x}?",
];

const COLOUR: &[&str] = &[
    "Is it {x}?",
    "Is the shape {x}?",
    "Is the shape in {it} {x}?",
    "Is {it} {x}?",
    "Is the object in {it} {x}?",
    "Is there anything {x} in {it}?",
    "Is the colour in {it} {x}?",
    "Is the figure in {it} coloured {x}?",
    "Do you see something {x} in {it}?",
    "Is the shape in {it} painted {x}?",
    "Is the thing in {it} {x} or not?",
    "Does {it} show a {x} shape?",
    "Is {x} the colour of the shape in {it}?",
    "Is the color of {it} {x}?",
];

const DESCRIBE_IMAGE: &[&str] = &[
    "Is there {x} in {it}?",
    "Is there {x} in the image?",
    "Does {it} show {x}?",
    "Is it {x}?",
    "Is this {x}?",
    "Do you see {x} in {it}?",
    "Is {it} a picture of {x}?",
    "Does {it} contain {x}?",
    "Is what {it} shows {x}?",
    "Can you find {x} in {it}?",
];

const COUNT: &[&str] = &[
    "Are there {x} in {it}?",
    "Does {it} have {x}?",
    "Do you hear {x} in {it}?",
    "Does {it} contain {x}?",
    "Is it {x}?",
    "Did you count {x} in {it}?",
    "Are there exactly {x}?",
    "Does {it} play {x}?",
    "Is the count {x}?",
];

const PITCH: &[&str] = &[
    "Are the beeps in {it} {x}?",
    "Is {it} {x}-pitched?",
    "Is the pitch of {it} {x}?",
    "Are the tones {x}?",
    "Are the beeps {x}?",
    "Is {it} {x}?",
    "Do the beeps in {it} sound {x}?",
    "Is the sound in {it} {x}?",
    "Is the pitch {x}?",
];

const DESCRIBE_AUDIO: &[&str] = &[
    "Does {it} have {x}?",
    "Is {it} {x}?",
    "Do you hear {x} in {it}?",
    "Are there {x} in {it}?",
    "Is it {x}?",
    "Does {it} play {x}?",
];

const TOPIC: &[&str] = &[
    "Is {it} about {x}?",
    "Is this about {x}?",
    "Does {it} talk about {x}?",
    "Is the topic of {it} {x}?",
    "Is {it} related to {x}?",
    "Does {it} discuss {x}?",
    "Is the subject {x}?",
    "Is {x} the topic of {it}?",
    "Is it about {x}?",
    "Would you file {it} under {x}?",
];

/// What an item holds, as far as a yes/no question can ask about it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Truth {
    /// An image: its shape and colour.
    Image(Shape, Colour),
    /// A clip: its beep count and pitch.
    Audio(usize, Pitch),
    /// A document: its topic.
    Document(Topic),
}

/// The beep counts a clip can have.
const COUNTS: [usize; 4] = [1, 2, 3, 4];

/// The value a question names: the item's own when `yes`, else another.
fn named<T: Copy + PartialEq>(yes: bool, all: &[T], right: T, rng: &mut Rng) -> T {
    if yes {
        right
    } else {
        pick_other(all, right, rng)
    }
}

/// The two values a question names about a two-fact item (a shape and its
/// colour, a count and its pitch): the item's own when `yes`, else one or
/// both of them wrong.
fn named_pair<A: Copy + PartialEq, B: Copy + PartialEq>(
    yes: bool,
    (all_a, a): (&[A], A),
    (all_b, b): (&[B], B),
    rng: &mut Rng,
) -> (A, B) {
    if yes {
        return (a, b);
    }
    match rng.range(0, 2) {
        0 => (pick_other(all_a, a, rng), b),
        1 => (a, pick_other(all_b, b, rng)),
        _ => (pick_other(all_a, a, rng), pick_other(all_b, b, rng)),
    }
}

fn beeps(count: usize) -> String {
    format!(
        "{} {}",
        count_word(count, false),
        if count == 1 { "beep" } else { "beeps" }
    )
}

fn adjective(shape: Shape) -> &'static str {
    match shape {
        Shape::Circle => "round",
        Shape::Square => "square",
        Shape::Triangle => "triangular",
    }
}

/// A yes/no question asking `asked` of an item holding `truth`, and its
/// answer: `answer` (the task's usual answer, "A square."), then the value
/// asked about and the verdict ("A circle? No."); the bare "Yes" or "No" after
/// [`SHORT_ANSWER`].
pub(crate) fn question(
    asked: Asked,
    truth: Truth,
    answer: &str,
    rng: &mut Rng,
) -> (String, String) {
    let yes = rng.range(0, 1) == 0;
    // `x` is the value named in the question ("a circle", "round", "three
    // beeps"); the answer repeats it, capitalised, before the verdict.
    let (templates, x): (&[&str], String) = match (asked, truth) {
        (Asked::Shape, Truth::Image(shape, _)) => {
            let x = named(yes, &Shape::ALL, shape, rng);
            if rng.range(0, 3) == 0 {
                (SHAPE_ADJECTIVE, adjective(x).to_string())
            } else {
                (SHAPE, format!("a {}", x.name()))
            }
        }
        (Asked::Colour, Truth::Image(_, colour)) => (
            COLOUR,
            named(yes, &Colour::ALL, colour, rng).name().to_string(),
        ),
        (_, Truth::Image(shape, colour)) => {
            let (s, c) = named_pair(yes, (&Shape::ALL, shape), (&Colour::ALL, colour), rng);
            (DESCRIBE_IMAGE, format!("a {} {}", c.name(), s.name()))
        }
        (Asked::Count, Truth::Audio(count, _)) => (COUNT, beeps(named(yes, &COUNTS, count, rng))),
        (Asked::Pitch, Truth::Audio(_, pitch)) => (
            PITCH,
            named(yes, &Pitch::ALL, pitch, rng).name().to_string(),
        ),
        (_, Truth::Audio(count, pitch)) => {
            let (n, p) = named_pair(yes, (&COUNTS, count), (&Pitch::ALL, pitch), rng);
            let plural = if n == 1 { "beep" } else { "beeps" };
            (
                DESCRIBE_AUDIO,
                format!("{} {} {plural}", count_word(n, false), p.name()),
            )
        }
        (_, Truth::Document(topic)) => (
            TOPIC,
            named(yes, &Topic::ALL, topic, rng).name().to_string(),
        ),
    };
    let nouns = match asked.kind() {
        Kind::Image => IMAGE_NOUNS[0],
        Kind::Audio => AUDIO_NOUNS[0],
        Kind::Document => DOCUMENT_NOUNS[0],
    };
    let template = pick(templates, rng);
    let question = capitalise(
        &template
            .replace("{x}", &x)
            .replace("{it}", pick(nouns, rng)),
    );
    let verdict = if yes { "Yes" } else { "No" };
    if rng.range(0, 3) == 0 {
        (format!("{question}\n{SHORT_ANSWER}"), verdict.to_string())
    } else {
        (question, format!("{answer} {}? {verdict}.", capitalise(&x)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::judge;

    /// Every asked value gets a question naming a value and an answer that
    /// starts with the right verdict: "Yes." exactly when the named value is
    /// the item's.
    #[test]
    fn verdicts_follow_the_item() {
        let mut rng = Rng::new(3);
        let mut seen = [0usize; 2];
        for _ in 0..400 {
            let (q, a) = question(
                Asked::DescribeImage,
                Truth::Image(Shape::Circle, Colour::Red),
                "A red circle.",
                &mut rng,
            );
            let names_truth = q.to_lowercase().contains("a red circle");
            let yes = a.ends_with("Yes") || a.ends_with("Yes.");
            assert_eq!(names_truth, yes, "{q:?} -> {a:?}");
            assert!(yes || a.ends_with("No") || a.ends_with("No."), "{a:?}");
            seen[usize::from(yes)] += 1;
            if a.contains(' ') {
                assert!(a.starts_with("A red circle. A "), "{a:?}");
            } else {
                assert!(q.ends_with(SHORT_ANSWER), "{q:?}");
            }
        }
        assert!(seen[0] > 100 && seen[1] > 100, "{seen:?}");
        for _ in 0..100 {
            let (q, a) = question(
                Asked::Count,
                Truth::Audio(1, Pitch::Low),
                "One beep.",
                &mut rng,
            );
            assert_eq!(
                q.contains("one beep"),
                a.ends_with("Yes") || a.ends_with("Yes."),
                "{q:?} -> {a:?}"
            );
            assert!(!q.contains("one beeps"), "{q:?}");
        }
    }

    /// The judge holds an answer to its verdict: the right facts before the
    /// wrong "Yes"/"No" are wrong.
    #[test]
    fn judge_reads_the_verdict() {
        let reference = "A square. A circle? No.";
        assert!(judge(reference, "A square. A circle? No."));
        assert!(judge(reference, "a square, a circle? no"));
        assert!(!judge(reference, "A square. A circle? Yes."));
        assert!(!judge(reference, "A square."));
        assert!(!judge(reference, "A circle. A circle? No."));
        assert!(!judge(reference, "No."));
        assert!(judge("Yes", "Yes"));
        assert!(!judge("Yes", "No"));
        assert!(!judge("Yes", "I can't tell from this."));
    }
}
