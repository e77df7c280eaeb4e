//! Batch collation: padding prepared rows to one length.
//!
//! Training pads on the right (positions keep their indexes, labels line up);
//! generation pads on the left so that every row's last position is its last
//! real token and new tokens append at the same index. Padding positions get
//! the pad id, attention mask 0 and label [`IGNORE_INDEX`]; spans move with
//! the left padding.

use candle_core::{Device, Tensor};

use crate::{Error, PlaceholderSpan, PreparedInput, Result, IGNORE_INDEX};

/// Which side padding goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaddingSide {
    /// Padding before the tokens: for generation.
    Left,
    /// Padding after the tokens: for training.
    Right,
}

/// Settings of [`collate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CollateConfig {
    /// Which side padding goes on.
    pub padding_side: PaddingSide,
    /// Id written at padding positions (masked out, so any valid id works).
    pub pad_id: u32,
}

impl CollateConfig {
    /// Right padding with `pad_id`: for training.
    pub fn training(pad_id: u32) -> Self {
        Self {
            padding_side: PaddingSide::Right,
            pad_id,
        }
    }

    /// Left padding with `pad_id`: for generation.
    pub fn generation(pad_id: u32) -> Self {
        Self {
            padding_side: PaddingSide::Left,
            pad_id,
        }
    }
}

/// A padded batch.
#[derive(Debug, Clone)]
pub struct Batch {
    /// `[batch, seq]` u32 token ids.
    pub input_ids: Tensor,
    /// `[batch, seq]` u32, 1 for real positions and 0 for padding.
    pub attention_mask: Tensor,
    /// `[batch, seq]` i64 labels, [`IGNORE_INDEX`] on padding.
    pub labels: Tensor,
    /// Each row's spans, shifted by its left padding.
    pub spans: Vec<Vec<PlaceholderSpan>>,
    /// Each row's real length.
    pub lengths: Vec<usize>,
}

/// Pads `rows` to the longest and stacks them on `device`.
pub fn collate(rows: &[PreparedInput], config: CollateConfig, device: &Device) -> Result<Batch> {
    if rows.is_empty() {
        return Err(Error::msg("cannot collate an empty batch"));
    }
    let seq_len = rows.iter().map(PreparedInput::len).max().unwrap_or(0);
    let batch = rows.len();
    let mut input_ids = Vec::with_capacity(batch * seq_len);
    let mut attention_mask = Vec::with_capacity(batch * seq_len);
    let mut labels = Vec::with_capacity(batch * seq_len);
    let mut spans = Vec::with_capacity(batch);
    let mut lengths = Vec::with_capacity(batch);
    for (index, row) in rows.iter().enumerate() {
        if row.labels.len() != row.input_ids.len() {
            return Err(Error::msg(format!(
                "row {index} has {} ids but {} labels",
                row.input_ids.len(),
                row.labels.len()
            )));
        }
        let padding = seq_len - row.len();
        let pad = |ids: &mut Vec<u32>, mask: &mut Vec<u32>, labels: &mut Vec<i64>| {
            ids.extend(std::iter::repeat_n(config.pad_id, padding));
            mask.extend(std::iter::repeat_n(0, padding));
            labels.extend(std::iter::repeat_n(IGNORE_INDEX, padding));
        };
        if config.padding_side == PaddingSide::Left {
            pad(&mut input_ids, &mut attention_mask, &mut labels);
        }
        input_ids.extend_from_slice(&row.input_ids);
        attention_mask.extend(std::iter::repeat_n(1u32, row.len()));
        labels.extend_from_slice(&row.labels);
        if config.padding_side == PaddingSide::Right {
            pad(&mut input_ids, &mut attention_mask, &mut labels);
        }
        let shift = if config.padding_side == PaddingSide::Left {
            padding
        } else {
            0
        };
        spans.push(
            row.spans
                .iter()
                .map(|span| PlaceholderSpan {
                    start: span.start + shift,
                    ..*span
                })
                .collect(),
        );
        lengths.push(row.len());
    }
    Ok(Batch {
        input_ids: Tensor::from_vec(input_ids, (batch, seq_len), device)?,
        attention_mask: Tensor::from_vec(attention_mask, (batch, seq_len), device)?,
        labels: Tensor::from_vec(labels, (batch, seq_len), device)?,
        spans,
        lengths,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(ids: &[u32], labels: &[i64], spans: &[(usize, usize, usize, usize)]) -> PreparedInput {
        PreparedInput {
            truncated_from: None,
            input_ids: ids.to_vec(),
            labels: labels.to_vec(),
            spans: spans
                .iter()
                .map(|&(modality, item_index, start, len)| PlaceholderSpan {
                    modality,
                    item_index,
                    item_offset: 0,
                    start,
                    len,
                    grid: None,
                })
                .collect(),
        }
    }

    /// The batch as plain vectors: ids, mask, labels, span starts, lengths.
    type Flat = (
        Vec<Vec<u32>>,
        Vec<Vec<u32>>,
        Vec<Vec<i64>>,
        Vec<Vec<usize>>,
        Vec<usize>,
    );

    fn check(rows: &[PreparedInput], config: CollateConfig, expect: Flat) -> Result<()> {
        let batch = collate(rows, config, &Device::Cpu)?;
        let starts = batch
            .spans
            .iter()
            .map(|spans| spans.iter().map(|span| span.start).collect())
            .collect();
        let got: Flat = (
            batch.input_ids.to_vec2()?,
            batch.attention_mask.to_vec2()?,
            batch.labels.to_vec2()?,
            starts,
            batch.lengths,
        );
        assert_eq!(got, expect);
        Ok(())
    }

    fn rows() -> Vec<PreparedInput> {
        vec![
            row(&[1, 0, 0, 5, 6], &[-100, -100, -100, 5, 6], &[(0, 0, 1, 2)]),
            row(&[1, 0, 7], &[-100, -100, 7], &[(1, 0, 1, 1)]),
        ]
    }

    #[test]
    fn right_padding_for_training() -> Result<()> {
        check(
            &rows(),
            CollateConfig::training(9),
            (
                vec![vec![1, 0, 0, 5, 6], vec![1, 0, 7, 9, 9]],
                vec![vec![1, 1, 1, 1, 1], vec![1, 1, 1, 0, 0]],
                vec![
                    vec![-100, -100, -100, 5, 6],
                    vec![-100, -100, 7, -100, -100],
                ],
                vec![vec![1], vec![1]],
                vec![5, 3],
            ),
        )
    }

    #[test]
    fn left_padding_for_generation_shifts_spans() -> Result<()> {
        check(
            &rows(),
            CollateConfig::generation(9),
            (
                vec![vec![1, 0, 0, 5, 6], vec![9, 9, 1, 0, 7]],
                vec![vec![1, 1, 1, 1, 1], vec![0, 0, 1, 1, 1]],
                vec![
                    vec![-100, -100, -100, 5, 6],
                    vec![-100, -100, -100, -100, 7],
                ],
                vec![vec![1], vec![3]],
                vec![5, 3],
            ),
        )
    }

    #[test]
    fn bad_batches_are_errors() {
        let empty = collate(&[], CollateConfig::training(0), &Device::Cpu)
            .err()
            .map(|e| e.to_string());
        assert_eq!(empty.as_deref(), Some("cannot collate an empty batch"));
        let ragged = collate(
            &[row(&[1, 2], &[-100], &[])],
            CollateConfig::training(0),
            &Device::Cpu,
        )
        .err()
        .map(|e| e.to_string());
        assert_eq!(ragged.as_deref(), Some("row 0 has 2 ids but 1 labels"));
    }
}
