//! Incremental detokenization with stop strings, one per running sequence.
//!
//! The scheduler decodes many sequences in lock step, so it cannot use
//! `multitoken_lm::generate`'s loop; this is the same technique (decode a window
//! that starts a few tokens back and compare with the window without the newest
//! tokens; hold text that ends in U+FFFD or could start a stop string).

use crate::error::{Error, Result};

/// The text of one sequence so far, and how much of it the client has seen.
#[derive(Debug, Default)]
pub struct Detokenizer {
    stop_strings: Vec<String>,
    prefix_offset: usize,
    read_offset: usize,
    /// All decoded text, cut before a stop string once one appears.
    pub text: String,
    emitted: usize,
}

impl Detokenizer {
    /// A detokenizer that ends the text before the first of `stop_strings`.
    pub fn new(stop_strings: Vec<String>) -> Self {
        let stop_strings = stop_strings.into_iter().filter(|s| !s.is_empty()).collect();
        Self {
            stop_strings,
            ..Default::default()
        }
    }

    /// Takes the ids generated so far (the newest at the end); returns the text
    /// that became final and whether a stop string was reached.
    pub fn push(&mut self, tokenizer: &tokenizers::Tokenizer, ids: &[u32]) -> Result<(String, bool)> {
        let decode = |ids: &[u32]| {
            tokenizer
                .decode(ids, true)
                .map_err(|e| Error::Internal(format!("detokenizing: {e}")))
        };
        let prefix = decode(&ids[self.prefix_offset..self.read_offset])?;
        let full = decode(&ids[self.prefix_offset..])?;
        if full.len() <= prefix.len() || full.ends_with('\u{FFFD}') || !full.starts_with(&prefix) {
            return Ok((String::new(), false));
        }
        self.text.push_str(&full[prefix.len()..]);
        self.prefix_offset = self.read_offset;
        self.read_offset = ids.len();
        if let Some(pos) = self.find_stop() {
            self.text.truncate(pos);
            return Ok((self.take_until(pos), true));
        }
        let until = self.text.len() - self.held_back_len();
        Ok((self.take_until(until), false))
    }

    /// Everything not yet given out (at the end of generation).
    pub fn flush(&mut self) -> String {
        self.take_until(self.text.len())
    }

    fn take_until(&mut self, until: usize) -> String {
        if until <= self.emitted {
            return String::new();
        }
        let piece = self.text.get(self.emitted..until).unwrap_or_default().to_string();
        self.emitted = until;
        piece
    }

    fn find_stop(&self) -> Option<usize> {
        let longest = self.stop_strings.iter().map(String::len).max()?;
        let mut from = self.emitted.saturating_sub(longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let window = &self.text[from..];
        self.stop_strings
            .iter()
            .filter_map(|s| window.find(s.as_str()))
            .min()
            .map(|p| from + p)
    }

    fn held_back_len(&self) -> usize {
        let mut hold = 0;
        for stop in &self.stop_strings {
            for (i, _) in stop.char_indices().skip(1) {
                if i > hold && self.text.ends_with(&stop[..i]) {
                    hold = i;
                }
            }
        }
        hold.min(self.text.len() - self.emitted)
    }
}
