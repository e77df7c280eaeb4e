//! `cargo xtask demo-model pretrained-lm`: a skeleton whose LM reads a real
//! LM's vocabulary. The tokenizer is a GGUF's byte-level BPE cut to its
//! `vocab` most frequent entries (BPE ids follow merge order, so the first
//! ids are the most frequent pieces and the cut vocabulary still spells any
//! text), and the embedding rows are that GGUF's own, projected onto their
//! top principal directions down to the demo LM's width.
//!
//! Why: a demo LM whose 640-piece vocabulary was learnt from its training
//! questions knows no word it was not trained on: "looking at" or "tally" are
//! strings of pieces it never learnt a meaning for. A real LM's embeddings put
//! "picture" beside "image" and "photo", "total" beside "overall", "describe"
//! beside "explain"; kept frozen while the small LM trains (`freeze_lm`),
//! unseen words keep those neighbours.
//!
//! The encoders (`vision/`, `audio/`, `document/`) and `multitoken.json` are
//! copied from an existing demo model (`--from`); the projectors start random,
//! since they map into the new LM's space.

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{Device, Tensor};
use multitoken_lm::gguf::{GgufSource, GgufWeights};
use multitoken_lm::loader::LoadOptions;
use multitoken_lm::WeightSource;
use serde_json::Value;

use super::skeleton;
use super::tokenizer::LM_SPECIAL;

/// RMS of an embedding element after projection: that of the trained
/// 640-piece demo LM's embeddings (0.122), so the layers see inputs of the
/// scale they were tuned for.
const EMBEDDING_RMS: f64 = 0.12;

/// Writes the skeleton into `out` (replaced): `lm/` from `gguf` with `vocab`
/// entries (ours specials included), everything else from `from`.
pub fn write(gguf: &Path, vocab: usize, from: &Path, out: &Path, seed: u64) -> Result<()> {
    if !vocab.is_multiple_of(64) || vocab < 512 {
        bail!("--vocab {vocab}: give a multiple of 64, at least 512");
    }
    // The project's reader: it refuses a malformed header with an error, never a panic.
    let source = GgufSource::open(gguf, &LoadOptions::default(), GgufWeights::Dequantized)?;
    let config = source.config()?;
    if out.exists() {
        std::fs::remove_dir_all(out).with_context(|| format!("removing {}", out.display()))?;
    }
    std::fs::create_dir_all(out.join("lm")).with_context(|| format!("creating {}", out.display()))?;
    let json: Value = serde_json::from_str(
        &source
            .tokenizer()?
            .tokenizer
            .to_string(false)
            .map_err(|e| anyhow!("serialising the GGUF tokenizer: {e}"))?,
    )?;
    let (tokenizer, kept) = cut_tokenizer(json, vocab)?;
    let path = out.join("lm/tokenizer.json");
    std::fs::write(&path, serde_json::to_string(&tokenizer)?).with_context(|| format!("writing {}", path.display()))?;
    // It must load and spell text with the kept pieces only.
    let loaded = tokenizers::Tokenizer::from_file(&path).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let probe = "What colour is the shape in this picture? <image> Count the beeps, please.";
    let ids = loaded.encode(probe, false).map_err(|e| anyhow!("{e}"))?.get_ids().to_vec();
    if ids.iter().any(|&id| id as usize >= vocab) || loaded.decode(&ids, false).map_err(|e| anyhow!("{e}"))? != probe {
        bail!("the cut tokenizer does not round-trip {probe:?}: {ids:?}");
    }

    let table = source.tensor("model.embed_tokens.weight", &[config.vocab_size, config.hidden_size])?;
    let embeddings = project(&table, &kept, vocab, seed)?;
    skeleton::write_lm_weights(&out.join("lm"), vocab, seed, Some(embeddings))?;

    for sub in ["vision", "audio", "document"] {
        super::build::copy_dir(&from.join(sub), &out.join(sub))?;
    }
    std::fs::copy(from.join("multitoken.json"), out.join("multitoken.json"))
        .with_context(|| format!("copying {}", from.join("multitoken.json").display()))?;
    skeleton::write_projectors(out, seed)?;
    println!(
        "pretrained-vocabulary skeleton in {} ({} pieces from {})",
        out.display(),
        vocab,
        gguf.display()
    );
    Ok(())
}

/// The GGUF tokenizer (`json`, as `tokenizers` writes it) cut to `vocab`
/// entries: ours specials first (ids 0..7), then the source's ordinary pieces
/// in id order. Returns the new tokenizer and, per new id, the source id its
/// embedding comes from (`None` for `<pad>` and our modality tokens).
fn cut_tokenizer(mut json: Value, vocab: usize) -> Result<(Value, Vec<Option<u32>>)> {
    let source_specials: std::collections::HashMap<String, u32> = json["added_tokens"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| Some((t["content"].as_str()?.to_string(), t["id"].as_u64()? as u32)))
                .collect()
        })
        .unwrap_or_default();
    let model = json
        .get_mut("model")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| anyhow!("the GGUF tokenizer has no model"))?;
    if model.get("type").and_then(Value::as_str) != Some("BPE") {
        bail!("the GGUF tokenizer is not a BPE");
    }
    let mut pieces: Vec<(String, u32)> = model
        .get("vocab")
        .and_then(Value::as_object)
        .ok_or_else(|| anyhow!("the GGUF tokenizer has no vocabulary"))?
        .iter()
        .filter_map(|(piece, id)| Some((piece.clone(), id.as_u64()? as u32)))
        .filter(|(piece, _)| !source_specials.contains_key(piece))
        .collect();
    pieces.sort_by_key(|(_, id)| *id);
    let ordinary = vocab - LM_SPECIAL.len();
    if pieces.len() < ordinary {
        bail!("the GGUF vocabulary has {} ordinary pieces, fewer than {ordinary}", pieces.len());
    }
    pieces.truncate(ordinary);
    let mut kept: Vec<Option<u32>> = LM_SPECIAL.iter().map(|s| source_specials.get(*s).copied()).collect();
    // The specials are in the model's vocabulary too, as transformers saves
    // them: added tokens absent from it would be given ids after the last piece.
    let mut new_vocab: serde_json::Map<String, Value> =
        LM_SPECIAL.iter().enumerate().map(|(id, s)| (s.to_string(), Value::from(id))).collect();
    for (i, (piece, source_id)) in pieces.iter().enumerate() {
        new_vocab.insert(piece.clone(), Value::from(LM_SPECIAL.len() + i));
        kept.push(Some(*source_id));
    }
    // A merge survives when both halves and the result are kept: with ids in
    // merge order, that is every merge up to the cut.
    let merges = model
        .get("merges")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("the GGUF tokenizer has no merges"))?;
    let halves = |m: &Value| -> Option<(String, String)> {
        match m {
            Value::String(s) => s.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())),
            Value::Array(a) => Some((a.first()?.as_str()?.to_string(), a.get(1)?.as_str()?.to_string())),
            _ => None,
        }
    };
    let kept_merges: Vec<Value> = merges
        .iter()
        .filter(|m| {
            halves(m).is_some_and(|(a, b)| {
                new_vocab.contains_key(&a) && new_vocab.contains_key(&b) && new_vocab.contains_key(&format!("{a}{b}"))
            })
        })
        .cloned()
        .collect();
    model.insert("vocab".into(), Value::Object(new_vocab));
    model.insert("merges".into(), Value::Array(kept_merges));
    json["added_tokens"] = Value::Array(
        LM_SPECIAL
            .iter()
            .enumerate()
            .map(|(id, content)| {
                serde_json::json!({"id": id, "content": content, "single_word": false, "lstrip": false,
                                   "rstrip": false, "normalized": false, "special": true})
            })
            .collect(),
    );
    Ok((json, kept))
}

/// The embedding table `[vocab, LM_HIDDEN]`: the source rows of `kept`,
/// centred, projected onto the top principal directions of the kept ordinary
/// rows and scaled to [`EMBEDDING_RMS`]. Rows without a source (`<pad>`, the
/// modality tokens) are zero for `<pad>` and seeded random otherwise (a
/// modality token's row is replaced by the item's features before the LM
/// reads it).
fn project(table: &Tensor, kept: &[Option<u32>], vocab: usize, seed: u64) -> Result<Tensor> {
    let (rows, width) = table.dims2()?;
    let hidden = skeleton::LM_HIDDEN;
    if let Some(id) = kept.iter().flatten().find(|&&id| id as usize >= rows) {
        bail!("the embedding table has {rows} rows, the tokenizer's piece {id} has none");
    }
    let source: Vec<Vec<f32>> = table.to_vec2()?;
    let ordinary: Vec<usize> = kept.iter().skip(LM_SPECIAL.len()).flatten().map(|&i| i as usize).collect();
    let n = ordinary.len() as f64;
    let mut mean = vec![0f64; width];
    for &i in &ordinary {
        for (m, &x) in mean.iter_mut().zip(&source[i]) {
            *m += f64::from(x) / n;
        }
    }
    // Covariance of the ordinary rows (width × width).
    let centred: Vec<f32> = ordinary
        .iter()
        .flat_map(|&i| source[i].iter().zip(&mean).map(|(&x, &m)| (f64::from(x) - m) as f32))
        .collect();
    let x = Tensor::from_vec(centred, (ordinary.len(), width), &Device::Cpu)?;
    let cov: Vec<Vec<f32>> = (x.t()?.matmul(&x)? / n)?.to_vec2()?;
    let basis = top_subspace(&cov, hidden, seed);
    let mut out = vec![0f32; vocab * hidden];
    let mut sum_sq = 0f64;
    for (row, source_id) in kept.iter().enumerate() {
        let Some(id) = source_id else { continue };
        let v = &source[*id as usize];
        for (k, direction) in basis.iter().enumerate() {
            let dot: f64 = direction.iter().zip(v).zip(&mean).map(|((d, &x), m)| d * (f64::from(x) - m)).sum();
            out[row * hidden + k] = dot as f32;
            if row >= LM_SPECIAL.len() {
                sum_sq += dot * dot;
            }
        }
    }
    let scale = EMBEDDING_RMS / (sum_sq / (n * hidden as f64)).sqrt();
    for x in out.iter_mut() {
        *x = (f64::from(*x) * scale) as f32;
    }
    // The modality tokens: seeded random at the same scale.
    let random = super::random::init_tensor(seed, "model.embed_tokens.modality", &[LM_SPECIAL.len(), hidden])?
        .to_vec2::<f32>()?;
    for (row, token) in LM_SPECIAL.iter().enumerate() {
        if kept[row].is_none() && *token != "<pad>" {
            for k in 0..hidden {
                out[row * hidden + k] = (f64::from(random[row][k]) * EMBEDDING_RMS / super::random::INIT_STD) as f32;
            }
        }
    }
    Ok(Tensor::from_vec(out, (vocab, hidden), &Device::Cpu)?)
}

/// An orthonormal basis of the `k` leading eigenvectors' span of the
/// symmetric matrix `m` (subspace iteration with Gram-Schmidt). Any basis of
/// that span gives the same geometry (dot products), which is all the LM sees.
fn top_subspace(m: &[Vec<f32>], k: usize, seed: u64) -> Vec<Vec<f64>> {
    let n = m.len();
    let mut rng = multitoken_datasets::Rng::new(seed ^ 0x0050_4341);
    let mut q: Vec<Vec<f64>> = (0..k).map(|_| (0..n).map(|_| rng.unit() - 0.5).collect()).collect();
    orthonormalise(&mut q);
    for _ in 0..200 {
        q = q
            .iter()
            .map(|v| m.iter().map(|row| row.iter().zip(v).map(|(&a, b)| f64::from(a) * b).sum()).collect())
            .collect();
        orthonormalise(&mut q);
    }
    q
}

fn orthonormalise(q: &mut [Vec<f64>]) {
    for i in 0..q.len() {
        let (done, rest) = q.split_at_mut(i);
        let v = &mut rest[0];
        for u in done.iter() {
            let dot: f64 = u.iter().zip(v.iter()).map(|(a, b)| a * b).sum();
            for (x, a) in v.iter_mut().zip(u) {
                *x -= dot * a;
            }
        }
        let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-30);
        for x in v.iter_mut() {
            *x /= norm;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BPE whose pieces are in merge order, with one special of its own.
    fn source() -> Value {
        serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null,
            "added_tokens": [{"id": 0, "content": "<|im_end|>", "single_word": false, "lstrip": false,
                              "rstrip": false, "normalized": false, "special": true}],
            "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                      "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                      "vocab": {"<|im_end|>": 0, "a": 1, "b": 2, "c": 3, "ab": 4, "abc": 5, "ca": 6},
                      "merges": [["a", "b"], ["ab", "c"], ["c", "a"]]}
        })
    }

    #[test]
    fn the_cut_keeps_the_first_pieces_and_their_merges_and_puts_our_specials_first() -> Result<()> {
        // Ours 7 specials + the first 4 ordinary pieces: a, b, c, ab (abc and ca are cut).
        let (json, kept) = cut_tokenizer(source(), LM_SPECIAL.len() + 4)?;
        let tokenizer = <tokenizers::Tokenizer as std::str::FromStr>::from_str(&json.to_string()).map_err(|e| anyhow!("{e}"))?;
        for (id, special) in LM_SPECIAL.iter().enumerate() {
            assert_eq!(tokenizer.token_to_id(special), Some(id as u32), "{special}");
        }
        assert_eq!(tokenizer.get_vocab_size(true), LM_SPECIAL.len() + 4);
        // The source's own special gives `<|im_end|>` its embedding; the others have none.
        let im_end = LM_SPECIAL.iter().position(|s| *s == "<|im_end|>").ok_or_else(|| anyhow!("no im_end"))?;
        assert_eq!(kept[im_end], Some(0));
        assert_eq!(kept.iter().filter(|k| k.is_some()).count(), 5);
        assert_eq!(&kept[LM_SPECIAL.len()..], &[Some(1), Some(2), Some(3), Some(4)]);
        // "abc" now spells as ab + c: the merge into the cut piece is gone, the text survives.
        let encoding = tokenizer.encode("abc<image>ca", false).map_err(|e| anyhow!("{e}"))?;
        assert_eq!(encoding.get_tokens(), ["ab", "c", "<image>", "c", "a"]);
        Ok(())
    }

    #[test]
    fn the_subspace_is_the_leading_eigenvectors_span() {
        // diag(5, 4, 3, 2, 1) rotated: the top 2 span the first two rotated axes.
        let n = 5;
        let (c, s) = (0.6f64, 0.8f64);
        let mut m = vec![vec![0f32; n]; n];
        let diag = [5.0, 4.0, 3.0, 2.0, 1.0];
        // Rotation in the (0, 2) plane.
        let rot = |i: usize, k: usize| -> f64 {
            match (i, k) {
                (0, 0) | (2, 2) => c,
                (0, 2) => -s,
                (2, 0) => s,
                (i, k) if i == k => 1.0,
                _ => 0.0,
            }
        };
        for i in 0..n {
            for j in 0..n {
                m[i][j] = (0..n).map(|k| rot(i, k) * diag[k] * rot(j, k)).sum::<f64>() as f32;
            }
        }
        let basis = top_subspace(&m, 2, 7);
        // Each basis vector lies in span{rot[:,0], rot[:,1]} = span{(c,0,s,0,0), (0,1,0,0,0)}.
        for v in &basis {
            let along = v[0] * c + v[2] * s;
            let in_span = along * along + v[1] * v[1];
            assert!((in_span - 1.0).abs() < 1e-6, "{v:?}");
        }
        let dot: f64 = basis[0].iter().zip(&basis[1]).map(|(a, b)| a * b).sum();
        assert!(dot.abs() < 1e-9);
    }
}
