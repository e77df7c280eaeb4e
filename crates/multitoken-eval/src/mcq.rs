//! Multiple-choice answers as VLMEvalKit reads them (`vlmeval/utils/matching_util.py`,
//! exact-matching mode: no LLM judge): `can_infer` tries the option letter
//! (`can_infer_option`), then the option text (`can_infer_text`).
//!
//! The letter rule: the answer with `.()[],:;!*#{}` turned into spaces is split
//! into words; when exactly one word is an option letter and it stands among
//! the last five words, that letter; no letter but a word `Z` means "refused"
//! (`Z`, always wrong); a few refusal sentences give `Z` too. Otherwise a
//! phrase "answer is B" / "correct answer is **B**" (any case) names the letter.
//! The text rule: when the answer is at most twice as long as all option texts
//! together and exactly one option's text occurs in it (case-insensitive), that option.

use std::sync::OnceLock;

use crate::pytext::{py_len, py_split};

/// One option of a question: its letter and its text.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    /// `A`..`Z`.
    pub letter: char,
    /// The option text, as VLMEvalKit's pandas would print it.
    pub text: String,
}

/// Builds choices from `(letter, text)` pairs (tests, callers with their own rows).
pub fn choices(pairs: &[(char, &str)]) -> Vec<Choice> {
    pairs
        .iter()
        .map(|&(letter, text)| Choice {
            letter,
            text: text.to_string(),
        })
        .collect()
}

/// Sentences after which VLMEvalKit answers `Z` (the model declined).
const REFUSALS: &[&str] = &[
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
];

fn verbose_answer() -> Option<&'static fancy_regex::Regex> {
    static RE: OnceLock<Option<fancy_regex::Regex>> = OnceLock::new();
    RE.get_or_init(|| {
        fancy_regex::Regex::new(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**").ok()
    })
    .as_ref()
}

/// `can_infer_option`: the option letter the answer names, `Some('Z')` for a
/// refusal, `None` when it names none.
pub fn can_infer_option(answer: &str, choices: &[Choice]) -> Option<char> {
    if answer.contains("Failed to obtain answer via API") {
        return None;
    }
    if REFUSALS.iter().any(|r| answer.contains(r)) {
        return Some('Z');
    }
    let spaced: String = answer
        .chars()
        .map(|c| if ".()[],:;!*#{}".contains(c) { ' ' } else { c })
        .collect();
    let words = py_split(&spaced);
    let is_word = |s: &str| words.contains(&s);
    let mut letter_buf = [0u8; 4];
    let count = choices
        .iter()
        .filter(|c| is_word(c.letter.encode_utf8(&mut letter_buf)))
        .count();
    if count == 1 {
        for c in choices {
            let letter = c.letter.to_string();
            // The first place the letter stands must be among the last five
            // words (a leading "A" is more likely the article).
            if let Some(pos) = words.iter().position(|w| *w == letter) {
                if pos as i64 > words.len() as i64 - 5 {
                    return Some(c.letter);
                }
            }
        }
    } else if count == 0 && is_word("Z") {
        return Some('Z');
    }
    let re = verbose_answer()?;
    let found = re.captures(answer).ok().flatten()?;
    let letter = found.get(1)?.as_str().to_uppercase().chars().next()?;
    choices.iter().any(|c| c.letter == letter).then_some(letter)
}

/// `can_infer_text`: the one option whose text occurs in the answer.
pub fn can_infer_text(answer: &str, choices: &[Choice]) -> Option<char> {
    let answer_lower = answer.to_lowercase();
    let total: usize = choices.iter().map(|c| py_len(&c.text)).sum();
    if py_len(&answer_lower) > 2 * total {
        return None;
    }
    let found: Vec<char> = choices
        .iter()
        .filter(|c| answer_lower.contains(&c.text.to_lowercase()))
        .map(|c| c.letter)
        .collect();
    match found.as_slice() {
        [one] => Some(*one),
        _ => None,
    }
}

/// `can_infer`: the letter rule, then the text rule. `None`: unparsed (wrong
/// in exact-matching mode).
pub fn can_infer(answer: &str, choices: &[Choice]) -> Option<char> {
    can_infer_option(answer, choices).or_else(|| can_infer_text(answer, choices))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn abcd() -> Vec<Choice> {
        choices(&[
            ('A', "teddy bear"),
            ('B', "rabbit"),
            ('C', "cat"),
            ('D', "dog"),
        ])
    }

    fn check(answer: &str, want: Option<char>) {
        assert_eq!(can_infer(answer, &abcd()), want, "{answer:?}");
    }

    #[test]
    fn letter_rule() {
        check("B", Some('B'));
        check("(C)", Some('C'));
        check("The answer: D.", Some('D'));
        check("**[A]**", Some('A'));
        check("Option {B}; done", Some('B'));
        // Two letters: no letter rule (and no option text): unparsed.
        check("A or B", None);
        // The letter must be among the last five words: here it is the 1st of 7.
        check("C is my pick for this one today", None);
        check("A bear sits next to the small rabbit toy", Some('B'));
        // Lower case is no letter.
        check("b", None);
    }

    #[test]
    fn letter_position_rule() {
        // words = [C, w, w, w, w, w]: index 0 > 6 - 5 = 1 is false, so the letter rule fails,
        // and "cat" is not in it either.
        check("C w w w w w", None);
        // 5 words: 0 > 0 false.
        check("C w w w w", None);
        // 4 words: 0 > -1.
        check("C w w w", Some('C'));
    }

    #[test]
    fn refusals_give_z() {
        check("Cannot determine the answer from the image", Some('Z'));
        check("Z", Some('Z'));
        check("I pick Z here", Some('Z'));
        // "Failed to obtain answer via API" skips the letter rule but not the text rule.
        check("Failed to obtain answer via API: cat", Some('C'));
    }

    #[test]
    fn verbose_answer_phrase() {
        // Two letters stand as words, so only the "answer is" phrase decides.
        check("The correct answer is **B**. A is wrong because", Some('B'));
        check("so the ANSWER IS c, not A or B", Some('C'));
        // The phrase's letter must be an option.
        let two = choices(&[('A', "x"), ('B', "y")]);
        assert_eq!(can_infer_option("Not A or B; the answer is D", &two), None);
    }

    #[test]
    fn text_rule() {
        check("a cat", Some('C'));
        check("It is a Dog.", Some('D'));
        // Two option texts: unparsed.
        check("cat and dog", None);
        // "teddy bear" contains no other option; "rabbit" alone.
        check("teddy bear", Some('A'));
        // Longer than twice all option texts together (2 * 23 = 46 characters): unparsed.
        check("a cat, which I can see very clearly in the picture", None);
        // Multi-byte text counts characters, as Python's len does.
        let cjk = choices(&[('A', "猫"), ('B', "狗")]);
        assert_eq!(can_infer("猫吧", &cjk), Some('A'));
        assert_eq!(can_infer("这是一只猫", &cjk), None);
    }
}
