//! Splicing projected item embeddings into token embeddings.
//!
//! The preparer leaves placeholder ids where each item's slots go (one run per
//! layout slot run); the
//! LM embeds them like any token, and the splice replaces those rows with the
//! projector's output. The new tensor is built by concatenating slices of the
//! token embeddings with the item embeddings, so gradients flow to both (the
//! projector trains through it) and no element is touched one at a time.

use candle_core::{DType, Tensor, D};

use crate::{Error, Item, Modality, PlaceholderSpan, Projector, Result};

/// Projected embeddings of one item and the span they go to.
#[derive(Debug, Clone)]
pub struct SpanEmbedding {
    /// Where the item goes.
    pub span: PlaceholderSpan,
    /// `[span.len, hidden]` embeddings of the item.
    pub embeds: Tensor,
}

/// Pairs each span of one sequence with its rows of the item's projected embeddings.
///
/// `projected[m][k]` holds the projected rows `[slots, hidden]` of item `k` of
/// modality `m` for this sequence (all its pieces, in order); a span gets the
/// `span.len` rows from `span.item_offset` on.
pub fn span_embeddings(
    spans: &[PlaceholderSpan],
    projected: &[Vec<Tensor>],
) -> Result<Vec<SpanEmbedding>> {
    spans
        .iter()
        .map(|span| {
            let items = projected.get(span.modality).ok_or_else(|| {
                Error::msg(format!(
                    "span at {}..{} is of modality {} but projected items were given for {} modalities",
                    span.start,
                    span.end(),
                    span.modality,
                    projected.len()
                ))
            })?;
            let item = items.get(span.item_index).ok_or_else(|| {
                Error::msg(format!(
                    "span at {}..{} wants item {} of modality {} but only {} were projected",
                    span.start,
                    span.end(),
                    span.item_index,
                    span.modality,
                    items.len()
                ))
            })?;
            let rows = item.dim(0)?;
            if span.item_offset + span.len > rows {
                return Err(Error::SpliceShape {
                    sequence: 0,
                    modality: span.modality,
                    item_index: span.item_index,
                    start: span.start,
                    end: span.end(),
                    reason: format!(
                        "the item's projected embeddings have {rows} rows but its layout wants rows {}..{}",
                        span.item_offset,
                        span.item_offset + span.len
                    ),
                });
            }
            Ok(SpanEmbedding { span: *span, embeds: item.narrow(0, span.item_offset, span.len)? })
        })
        .collect()
}

/// Preprocesses and encodes one item: the feature pieces its projector maps
/// one at a time ([`Modality::encode_item`]).
///
/// A panic in the modality's code is caught and reported as an error naming
/// the modality.
pub fn encode_item(modality: &dyn Modality, item: &Item) -> Result<Vec<Tensor>> {
    let pieces = crate::registry::guard(modality.name(), "encoding an item", || {
        let preprocessed = modality.preprocess(item)?;
        modality.encode_item(&preprocessed)
    })?;
    // A NaN from an encoder would flow through the projector and the LM and
    // come out as an empty or garbled answer with no error: stop it here. One
    // f32 sum per piece (NaN and infinities propagate into it).
    for (i, piece) in pieces.iter().enumerate() {
        let total = piece.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?;
        if !total.is_finite() {
            return Err(Error::msg(format!(
                "modality `{}` encoded an item into non-finite features (NaN or infinity) in piece {i} of shape {:?}",
                modality.name(),
                piece.dims()
            )));
        }
    }
    Ok(pieces)
}

/// Projects an item's feature pieces and joins their rows: `[slots, hidden]`
/// in `dtype`. Fails when the rows differ from the item's layout slots.
pub fn project_item(
    projector: &Projector,
    pieces: &[Tensor],
    dtype: DType,
    slots: usize,
) -> Result<Tensor> {
    let mut rows = Vec::with_capacity(pieces.len());
    for piece in pieces {
        let out = projector.forward(&piece.to_dtype(dtype)?)?;
        let hidden = out.dim(D::Minus1)?;
        rows.push(out.reshape(((), hidden))?);
    }
    let joined = match rows.len() {
        0 => return Err(Error::msg("the item was encoded into no pieces")),
        1 => rows.remove(0),
        _ => Tensor::cat(&rows, 0)?,
    };
    let got = joined.dim(0)?;
    if got != slots {
        return Err(Error::msg(format!(
            "the projector gave {got} rows for the item but its layout has {slots} slots"
        )));
    }
    Ok(joined)
}

/// Writes item embeddings into `token_embeds` `[batch, seq, hidden]` at their
/// spans and returns the new embeddings; `per_sequence[i]` holds the items of
/// sequence `i`. Item embeddings are cast to the token embeddings' dtype.
///
/// Fails naming the span when an item's shape is not `[span.len, hidden]`, a
/// span runs past the sequence, or spans overlap.
pub fn splice_embeddings(
    token_embeds: &Tensor,
    per_sequence: &[Vec<SpanEmbedding>],
) -> Result<Tensor> {
    let (batch, seq_len, hidden) = token_embeds.dims3().map_err(|_| {
        Error::msg(format!(
            "splice expects token embeddings [batch, seq, hidden], got {:?}",
            token_embeds.dims()
        ))
    })?;
    if per_sequence.len() != batch {
        return Err(Error::msg(format!(
            "splice got items for {} sequences but the batch has {batch}",
            per_sequence.len()
        )));
    }
    if per_sequence.iter().all(Vec::is_empty) {
        return Ok(token_embeds.clone());
    }
    let rows = per_sequence
        .iter()
        .enumerate()
        .map(|(sequence, items)| {
            splice_row(
                &token_embeds.get(sequence)?,
                sequence,
                seq_len,
                hidden,
                items,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::stack(&rows, 0)?)
}

/// Splices one sequence `[seq, hidden]`.
fn splice_row(
    row: &Tensor,
    sequence: usize,
    seq_len: usize,
    hidden: usize,
    items: &[SpanEmbedding],
) -> Result<Tensor> {
    if items.is_empty() {
        return Ok(row.clone());
    }
    let mut ordered: Vec<&SpanEmbedding> = items.iter().collect();
    ordered.sort_by_key(|item| item.span.start);
    let mut pieces = Vec::with_capacity(2 * ordered.len() + 1);
    let mut cursor = 0;
    for item in ordered {
        let span = item.span;
        let fail = |reason: String| Error::SpliceShape {
            sequence,
            modality: span.modality,
            item_index: span.item_index,
            start: span.start,
            end: span.end(),
            reason,
        };
        if span.end() > seq_len {
            return Err(fail(format!("the sequence has only {seq_len} positions")));
        }
        if span.start < cursor {
            return Err(fail(format!(
                "overlaps the previous span, which ends at {cursor}"
            )));
        }
        let dims = item.embeds.dims();
        if dims.len() != 2 || dims[0] != span.len || item.embeds.dim(D::Minus1)? != hidden {
            return Err(fail(format!(
                "expected item embeddings [{}, {hidden}], got {dims:?}",
                span.len
            )));
        }
        if span.start > cursor {
            pieces.push(row.narrow(0, cursor, span.start - cursor)?);
        }
        pieces.push(item.embeds.to_dtype(row.dtype())?);
        cursor = span.end();
    }
    if cursor < seq_len {
        pieces.push(row.narrow(0, cursor, seq_len - cursor)?);
    }
    Ok(Tensor::cat(&pieces, 0)?)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    fn span(modality: usize, item_index: usize, start: usize, len: usize) -> PlaceholderSpan {
        PlaceholderSpan {
            modality,
            item_index,
            item_offset: 0,
            start,
            len,
            grid: None,
        }
    }

    /// Numbers from inline text, encoded as they are: `"1 NaN"` gives a NaN feature.
    struct Numbers;

    impl Modality for Numbers {
        fn name(&self) -> &str {
            "test_numbers"
        }
        fn token(&self) -> &str {
            "<numbers>"
        }
        fn data_key(&self) -> &str {
            "numbers"
        }
        fn token_width(&self) -> usize {
            1
        }
        fn feature_dim(&self) -> usize {
            2
        }
        fn preprocess(&self, item: &Item) -> Result<Tensor> {
            let Item::Text(text) = item else { return Err(Error::msg("inline numbers only")) };
            let values: Vec<f32> = text.split_whitespace().map(|v| v.parse().unwrap_or(0.0)).collect();
            Ok(Tensor::from_vec(values, (1, 2), &Device::Cpu)?)
        }
        fn encode(&self, batch: &Tensor) -> Result<Tensor> {
            Ok(batch.clone())
        }
        fn projector(&self) -> crate::ProjectorSpec {
            crate::ProjectorSpec::Linear
        }
    }

    #[test]
    fn non_finite_features_are_an_error_naming_the_modality() -> Result<()> {
        let fine = encode_item(&Numbers, &Item::Text("1 2".into()))?;
        assert_eq!(fine[0].dims(), [1, 1, 2]);
        for bad in ["1 NaN", "inf 0", "-inf 3"] {
            let err = encode_item(&Numbers, &Item::Text(bad.into())).map(|_| ()).unwrap_err().to_string();
            assert!(err.contains("test_numbers") && err.contains("non-finite"), "{bad}: {err}");
        }
        Ok(())
    }

    /// Token embeddings where position `p` of sequence `s` holds `[s*100 + p, -(s*100 + p)]`.
    fn token_embeds(batch: usize, seq: usize) -> Result<Tensor> {
        let values: Vec<f32> = (0..batch)
            .flat_map(|s| {
                (0..seq).flat_map(move |p| {
                    let v = (s * 100 + p) as f32;
                    [v, -v]
                })
            })
            .collect();
        Ok(Tensor::from_vec(values, (batch, seq, 2), &Device::Cpu)?)
    }

    /// An item of `len` rows all equal to `[value, value]`.
    fn item(span: PlaceholderSpan, value: f32) -> Result<SpanEmbedding> {
        Ok(SpanEmbedding {
            span,
            embeds: Tensor::full(value, (span.len, 2), &Device::Cpu)?,
        })
    }

    /// Splices and returns the first column of each sequence, or the error text.
    fn check(
        batch: usize,
        seq: usize,
        per_sequence: Vec<Vec<SpanEmbedding>>,
        expect: &str,
    ) -> Result<()> {
        let got = match splice_embeddings(&token_embeds(batch, seq)?, &per_sequence) {
            Ok(out) => format!("{:?}", out.narrow(2, 0, 1)?.squeeze(2)?.to_vec2::<f32>()?),
            Err(error) => error.to_string(),
        };
        assert_eq!(got, expect);
        Ok(())
    }

    #[test]
    fn items_replace_their_spans_only() -> Result<()> {
        check(
            2,
            6,
            vec![
                vec![item(span(0, 1, 4, 2), 9.0)?, item(span(0, 0, 1, 2), 7.0)?],
                vec![item(span(1, 0, 0, 1), 5.0)?],
            ],
            "[[0.0, 7.0, 7.0, 3.0, 9.0, 9.0], [5.0, 101.0, 102.0, 103.0, 104.0, 105.0]]",
        )?;
        check(1, 3, vec![vec![]], "[[0.0, 1.0, 2.0]]")?;
        // Back-to-back items of different modalities.
        check(
            1,
            4,
            vec![vec![
                item(span(0, 0, 0, 2), 1.5)?,
                item(span(1, 0, 2, 2), 2.5)?,
            ]],
            "[[1.5, 1.5, 2.5, 2.5]]",
        )
    }

    #[test]
    fn mismatches_name_the_span() -> Result<()> {
        let wrong_width = SpanEmbedding {
            span: span(0, 1, 1, 2),
            embeds: Tensor::zeros((3, 2), DType::F32, &Device::Cpu)?,
        };
        check(
            1,
            6,
            vec![vec![wrong_width]],
            "splice: sequence 0, span of modality 0 item 1 at 1..3: expected item embeddings [2, 2], got [3, 2]",
        )?;
        let wrong_hidden = SpanEmbedding {
            span: span(1, 0, 0, 1),
            embeds: Tensor::zeros((1, 4), DType::F32, &Device::Cpu)?,
        };
        check(
            2,
            3,
            vec![vec![], vec![wrong_hidden]],
            "splice: sequence 1, span of modality 1 item 0 at 0..1: expected item embeddings [1, 2], got [1, 4]",
        )?;
        check(
            1,
            3,
            vec![vec![item(span(0, 0, 2, 2), 1.0)?]],
            "splice: sequence 0, span of modality 0 item 0 at 2..4: the sequence has only 3 positions",
        )?;
        check(
            1,
            6,
            vec![vec![item(span(0, 0, 0, 3), 1.0)?, item(span(0, 1, 2, 2), 1.0)?]],
            "splice: sequence 0, span of modality 0 item 1 at 2..4: overlaps the previous span, which ends at 3",
        )?;
        check(
            2,
            3,
            vec![vec![]],
            "splice got items for 1 sequences but the batch has 2",
        )
    }

    #[test]
    fn dtype_follows_the_token_embeddings_and_gradients_reach_items() -> Result<()> {
        let tokens = token_embeds(1, 3)?.to_dtype(DType::F16)?;
        let out = splice_embeddings(&tokens, &[vec![item(span(0, 0, 1, 1), 4.0)?]])?;
        assert_eq!(out.dtype(), DType::F16);

        let projected =
            candle_core::Var::from_tensor(&Tensor::ones((1, 2), DType::F32, &Device::Cpu)?)?;
        let spliced = splice_embeddings(
            &token_embeds(1, 3)?,
            &[vec![SpanEmbedding {
                span: span(0, 0, 1, 1),
                embeds: projected.as_tensor().clone(),
            }]],
        )?;
        let grads = spliced.sum_all()?.backward()?;
        let grad = grads
            .get(projected.as_tensor())
            .ok_or_else(|| Error::msg("no gradient reached the item"))?;
        assert_eq!(grad.to_vec2::<f32>()?, vec![vec![1.0, 1.0]]);
        Ok(())
    }

    #[test]
    fn span_embeddings_pick_the_kth_item_of_each_modality() -> Result<()> {
        // Modality 0: two items of one row, values 10 and 11; modality 1: one item of two rows, value 20.
        let images = vec![
            Tensor::from_vec(vec![10f32, 10.], (1, 2), &Device::Cpu)?,
            Tensor::from_vec(vec![11f32, 11.], (1, 2), &Device::Cpu)?,
        ];
        let audio = vec![Tensor::full(20f32, (2, 2), &Device::Cpu)?];
        let spans = [span(0, 1, 0, 1), span(1, 0, 1, 2), span(0, 0, 3, 1)];
        let paired = span_embeddings(&spans, &[images.clone(), audio.clone()])?;
        let firsts: Vec<f32> = paired
            .iter()
            .map(|p| p.embeds.get(0)?.get(0)?.to_scalar::<f32>())
            .collect::<candle_core::Result<_>>()?;
        assert_eq!(firsts, vec![11.0, 20.0, 10.0]);

        let missing = span_embeddings(&[span(0, 2, 0, 1)], std::slice::from_ref(&images))
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            missing.as_deref(),
            Some("span at 0..1 wants item 2 of modality 0 but only 2 were projected")
        );
        let no_modality = span_embeddings(&[span(1, 0, 0, 1)], &[images])
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            no_modality.as_deref(),
            Some("span at 0..1 is of modality 1 but projected items were given for 1 modalities")
        );
        Ok(())
    }

    #[test]
    fn runs_of_one_item_take_its_rows_from_their_offsets() -> Result<()> {
        // One item of 5 rows valued 0..5, spread over two runs: rows 0..2 and 2..5.
        let rows: Vec<f32> = (0..5).flat_map(|r| [r as f32, r as f32]).collect();
        let item = vec![Tensor::from_vec(rows, (5, 2), &Device::Cpu)?];
        let first = PlaceholderSpan { modality: 0, item_index: 0, item_offset: 0, start: 1, len: 2, grid: None };
        let second = PlaceholderSpan { modality: 0, item_index: 0, item_offset: 2, start: 4, len: 3, grid: None };
        let paired = span_embeddings(&[first, second], &[item.clone()])?;
        let firsts: Vec<Vec<f32>> = paired
            .iter()
            .map(|p| p.embeds.narrow(1, 0, 1)?.squeeze(1)?.to_vec1::<f32>())
            .collect::<candle_core::Result<_>>()?;
        assert_eq!(firsts, vec![vec![0.0, 1.0], vec![2.0, 3.0, 4.0]]);
        let past = PlaceholderSpan { item_offset: 3, ..second };
        let error = span_embeddings(&[past], &[item]).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(error.contains("have 5 rows but its layout wants rows 3..6"), "{error}");
        Ok(())
    }
}
