//! Incremental detokenization with stop strings, one per running sequence.
//!
//! The scheduler decodes many sequences in lock step, so it cannot use
//! `multitoken_lm::generate`'s loop; this is the same technique (decode a window
//! that starts a few tokens back and compare with the window without the newest
//! tokens; hold text that ends in U+FFFD or could start a stop string).
//!
//! Stop strings are matched incrementally ([`StopMatcher`]): each new byte of
//! text is looked at once per partial match alive at it, so a request's stop
//! strings cost the scheduler thread (which decodes every user's tokens) time
//! in proportion to the text generated, never to the stop strings' total size.

use crate::error::{Error, Result};

/// The text of one sequence so far, and how much of it the client has seen.
#[derive(Debug, Default)]
pub struct Detokenizer {
    stops: StopMatcher,
    /// Bytes of `text` the matcher has seen.
    scanned: usize,
    prefix_offset: usize,
    read_offset: usize,
    /// All decoded text, cut before a stop string once one appears.
    pub text: String,
    emitted: usize,
}

impl Detokenizer {
    /// A detokenizer that ends the text before the first of `stop_strings`.
    pub fn new(stop_strings: Vec<String>) -> Self {
        Self {
            stops: StopMatcher::new(&stop_strings),
            ..Default::default()
        }
    }

    /// Takes the ids generated so far (the newest at the end); returns the text
    /// that became final and whether a stop string was reached.
    pub fn push(
        &mut self,
        tokenizer: &tokenizers::Tokenizer,
        ids: &[u32],
    ) -> Result<(String, bool)> {
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
        let piece = self
            .text
            .get(self.emitted..until)
            .unwrap_or_default()
            .to_string();
        self.emitted = until;
        piece
    }

    /// Feeds the text not yet scanned to the matcher: the start of the first
    /// stop string found, if one completed.
    fn find_stop(&mut self) -> Option<usize> {
        let found = self.stops.feed(self.text.as_bytes(), self.scanned);
        self.scanned = self.text.len();
        found
    }

    /// Bytes at the end of the text that could be the start of a stop string.
    fn held_back_len(&self) -> usize {
        let hold = self
            .stops
            .earliest_partial()
            .map_or(0, |start| self.text.len() - start);
        hold.min(self.text.len() - self.emitted)
    }
}

/// The stop strings as a trie, and the partial matches alive at the end of
/// the text scanned so far (one per start position, at most as many as the
/// longest stop string has bytes).
#[derive(Debug, Default)]
pub struct StopMatcher {
    /// Per node: its children by byte (sorted), and whether a stop string ends here.
    nodes: Vec<TrieNode>,
    /// (start offset in the text, trie node) of each partial match.
    partial: Vec<(usize, usize)>,
}

#[derive(Debug, Default)]
struct TrieNode {
    children: Vec<(u8, usize)>,
    terminal: bool,
}

impl StopMatcher {
    /// A matcher for `stop_strings` (empty ones ignored).
    pub fn new(stop_strings: &[String]) -> Self {
        let mut nodes = vec![TrieNode::default()];
        for stop in stop_strings.iter().filter(|s| !s.is_empty()) {
            let mut node = 0;
            for &byte in stop.as_bytes() {
                node = match nodes[node]
                    .children
                    .binary_search_by_key(&byte, |&(b, _)| b)
                {
                    Ok(i) => nodes[node].children[i].1,
                    Err(i) => {
                        let child = nodes.len();
                        nodes[node].children.insert(i, (byte, child));
                        nodes.push(TrieNode::default());
                        child
                    }
                };
            }
            nodes[node].terminal = true;
        }
        Self {
            nodes,
            partial: Vec::new(),
        }
    }

    /// Whether there are any stop strings.
    pub fn is_empty(&self) -> bool {
        self.nodes[0].children.is_empty()
    }

    /// Scans `text[from..]` (the bytes added since the last call; `text[..from]`
    /// was scanned before). Returns the start of the earliest-starting stop
    /// string completed in these bytes, if any (as a search of the whole new
    /// text would: all of it is scanned, a new piece being one token's text).
    pub fn feed(&mut self, text: &[u8], from: usize) -> Option<usize> {
        if self.is_empty() {
            return None;
        }
        let mut found: Option<usize> = None;
        for (at, &byte) in text.iter().enumerate().skip(from) {
            // A match may start at every byte.
            self.partial.push((at, 0));
            let nodes = &self.nodes;
            self.partial.retain_mut(|(start, node)| {
                match nodes[*node]
                    .children
                    .binary_search_by_key(&byte, |&(b, _)| b)
                {
                    Ok(i) => {
                        *node = nodes[*node].children[i].1;
                        if nodes[*node].terminal {
                            found = Some(found.map_or(*start, |f| f.min(*start)));
                        }
                        true
                    }
                    Err(_) => false,
                }
            });
        }
        found
    }

    /// Where the earliest partial match alive at the end of the scanned text starts.
    pub fn earliest_partial(&self) -> Option<usize> {
        self.partial.iter().map(|&(start, _)| start).min()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// The first stop string by start (naive), and the bytes at the end that
    /// begin one (naive), for `text` fed in `pieces`.
    fn naive(stops: &[&str], text: &str) -> (Option<usize>, usize) {
        let first = stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| text.find(s))
            .min();
        let mut hold = 0;
        for stop in stops {
            for (i, _) in stop.char_indices().skip(1) {
                if text.ends_with(&stop[..i]) {
                    hold = hold.max(i);
                }
            }
        }
        (first, hold)
    }

    #[test]
    fn matches_like_the_naive_search() {
        let cases: &[(&[&str], &[&str])] = &[
            (&["\n\n"], &["a\n", "b", "\n", "\nc"]),
            (&["abcd", "bc"], &["ab", "cd"]),
            (&["abcd", "bc"], &["a", "b", "c"]),
            (&["aaab"], &["aa", "aa", "aa", "b"]),
            (&["aaab"], &["aa", "aa", "a"]),
            (&["", "é!"], &["caf", "é", "!"]),
            (&["END"], &["no stop here"]),
            (&[], &["anything"]),
        ];
        for (stops, pieces) in cases {
            let owned: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
            let mut matcher = StopMatcher::new(&owned);
            let mut text = String::new();
            for piece in *pieces {
                let from = text.len();
                text.push_str(piece);
                let got = matcher.feed(text.as_bytes(), from);
                let (want, hold) = naive(stops, &text);
                if got.is_some() {
                    assert_eq!(got, want, "{stops:?} {pieces:?}");
                    break;
                }
                assert_eq!(want, None, "{stops:?} {pieces:?}: missed at {text:?}");
                let held = matcher
                    .earliest_partial()
                    .map_or(0, |start| text.len() - start);
                assert_eq!(held, hold, "{stops:?} {pieces:?}: held back at {text:?}");
            }
        }
    }

    #[test]
    fn a_long_stop_string_costs_in_proportion_to_the_text() {
        // 64 stop strings of 512 `a`s then `b`, and text of `a`s: every
        // partial match stays alive, but there are never more than 512 of them
        // whatever the number of stop strings.
        let stops: Vec<String> = (0..64).map(|i| format!("{}{i}", "a".repeat(512))).collect();
        let mut matcher = StopMatcher::new(&stops);
        let text = "a".repeat(5000);
        for end in (10..=text.len()).step_by(10) {
            assert_eq!(matcher.feed(&text.as_bytes()[..end], end - 10), None);
            assert!(matcher.partial.len() <= 513, "{}", matcher.partial.len());
        }
    }
}
