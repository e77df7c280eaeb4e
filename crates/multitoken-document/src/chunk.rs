//! Chunking by the encoder's tokenizer: a long document becomes many windows of at
//! most the encoder's maximum length, with a configurable overlap; nothing is
//! silently truncated.

use crate::{Error, Result};

/// How documents are cut into encoder windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkConfig {
    /// Tokens per window, special tokens included; `None` means the encoder's
    /// `max_seq_length` (256 for all-MiniLM-L6-v2, 512 for GTE).
    pub max_tokens: Option<usize>,
    /// Tokens shared by consecutive windows.
    pub overlap: usize,
}

impl Default for ChunkConfig {
    fn default() -> Self {
        Self {
            max_tokens: None,
            overlap: 32,
        }
    }
}

/// Cuts `ids` (text tokens, no special tokens) into windows of at most
/// `max_tokens` tokens each once `prefix` and `suffix` (e.g. `[CLS]`, `[SEP]`)
/// are added around them, consecutive windows sharing `overlap` text tokens.
///
/// Empty `ids` give no windows. Fails when the settings leave no room for text or
/// when the overlap is not smaller than a window's text.
pub fn windows(
    ids: &[u32],
    prefix: &[u32],
    suffix: &[u32],
    max_tokens: usize,
    overlap: usize,
) -> Result<Vec<Vec<u32>>> {
    let specials = prefix.len() + suffix.len();
    let room = max_tokens.checked_sub(specials).filter(|&room| room > 0).ok_or_else(|| {
        Error::Config(format!(
            "chunks of {max_tokens} tokens leave no room for text next to {specials} special tokens"
        ))
    })?;
    if overlap >= room {
        return Err(Error::Config(format!(
            "chunk overlap {overlap} must be smaller than the {room} text tokens of a chunk"
        )));
    }
    let stride = room - overlap;
    let mut out = Vec::with_capacity(ids.len().div_ceil(stride));
    let mut start = 0;
    while start < ids.len() {
        let end = (start + room).min(ids.len());
        let mut window = Vec::with_capacity(end - start + specials);
        window.extend_from_slice(prefix);
        window.extend_from_slice(&ids[start..end]);
        window.extend_from_slice(suffix);
        out.push(window);
        if end == ids.len() {
            break;
        }
        start += stride;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Windows of `0..n` with `[100]` / `[101]` around them, rendered compactly.
    fn check(n: u32, max_tokens: usize, overlap: usize, expect: &str) {
        let ids: Vec<u32> = (0..n).collect();
        let got = match windows(&ids, &[100], &[101], max_tokens, overlap) {
            Ok(windows) => windows
                .iter()
                .map(|w| w.iter().map(u32::to_string).collect::<Vec<_>>().join(","))
                .collect::<Vec<_>>()
                .join(" | "),
            Err(error) => format!("error: {error}"),
        };
        assert_eq!(got, expect);
    }

    #[test]
    fn windows_cover_everything_with_overlap() {
        check(0, 6, 1, "");
        check(3, 6, 1, "100,0,1,2,101");
        check(4, 6, 1, "100,0,1,2,3,101");
        check(5, 6, 1, "100,0,1,2,3,101 | 100,3,4,101");
        check(7, 6, 0, "100,0,1,2,3,101 | 100,4,5,6,101");
        check(8, 5, 2, "100,0,1,2,101 | 100,1,2,3,101 | 100,2,3,4,101 | 100,3,4,5,101 | 100,4,5,6,101 | 100,5,6,7,101");
        check(3, 2, 0, "error: document config: chunks of 2 tokens leave no room for text next to 2 special tokens");
        check(3, 6, 4, "error: document config: chunk overlap 4 must be smaller than the 4 text tokens of a chunk");
    }
}
