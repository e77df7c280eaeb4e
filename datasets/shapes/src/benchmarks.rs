//! Small benchmark-format files of the shapes images, for `multitoken eval
//! --benchmark`: an MMBench TSV as VLMEvalKit ships it (base64 PNGs, circular
//! copies of every question with the options rotated, copies naming their
//! original's index in the `image` column) and a POPE TSV (yes/no: "Is there a
//! red circle in the image?", half of them about a shape that is not there).
//!
//! Like the rest of the crate, the same seed gives the same bytes.

use crate::images::{png_bytes, render, Colour, Shape, ShapeSpec};
use crate::rows::{pick, pick_other};
use crate::{Error, Result, Rng};

/// Index offset of the k-th circular copy (VLMEvalKit: `index % 1e6` groups them).
pub const CIRCULAR_OFFSET: usize = 1_000_000;

/// Standard base64 with padding.
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn image_base64(shape: Shape, colour: Colour, rng: &mut Rng) -> Result<String> {
    let spec = ShapeSpec::random(shape, colour, rng);
    let png = png_bytes(&render(&spec, rng)).map_err(|message| Error::Image {
        path: "<benchmark image>".into(),
        message,
    })?;
    Ok(base64(&png))
}

fn shuffle<T>(items: &mut [T], rng: &mut Rng) {
    for i in (1..items.len()).rev() {
        let j = rng.range(0, i);
        items.swap(i, j);
    }
}

/// One question before its rotations.
struct Question {
    question: &'static str,
    hint: Option<&'static str>,
    options: Vec<String>,
    answer: usize,
    category: &'static str,
    l2: &'static str,
}

/// An MMBench-format TSV: `per_task` questions of each of three tasks (the
/// shape; the colour; which description fits), each with one circular copy
/// per further option.
pub fn mmbench_tsv(seed: u64, per_task: usize) -> Result<String> {
    let mut rng = Rng::new(seed).fork(0x6d6d_6265);
    let mut out = String::from(
        "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\tl2-category\tsplit\timage\n",
    );
    let mut index = 0usize;
    for task in 0..3 {
        for _ in 0..per_task {
            index += 1;
            let shape = pick(&Shape::ALL, &mut rng);
            let colour = pick(&Colour::ALL, &mut rng);
            let image = image_base64(shape, colour, &mut rng)?;
            let q = match task {
                0 => {
                    let mut options: Vec<String> =
                        Shape::ALL.iter().map(|s| s.name().to_string()).collect();
                    shuffle(&mut options, &mut rng);
                    let answer = options.iter().position(|o| o == shape.name()).unwrap_or(0);
                    Question {
                        question: "What shape is shown in the image?",
                        hint: None,
                        options,
                        answer,
                        category: "shape_recognition",
                        l2: "coarse_perception",
                    }
                }
                1 => {
                    let mut options: Vec<String> =
                        Colour::ALL.iter().map(|c| c.name().to_string()).collect();
                    shuffle(&mut options, &mut rng);
                    let answer = options.iter().position(|o| o == colour.name()).unwrap_or(0);
                    Question {
                        question: "What colour is the shape?",
                        hint: Some("The image shows one shape on a plain background."),
                        options,
                        answer,
                        category: "colour_recognition",
                        l2: "finegrained_perception (instance-level)",
                    }
                }
                _ => {
                    let right = format!("a {} {}", colour.name(), shape.name());
                    let mut options = vec![right.clone()];
                    while options.len() < 4 {
                        let other = format!(
                            "a {} {}",
                            pick(&Colour::ALL, &mut rng).name(),
                            pick(&Shape::ALL, &mut rng).name()
                        );
                        if !options.contains(&other) {
                            options.push(other);
                        }
                    }
                    shuffle(&mut options, &mut rng);
                    let answer = options.iter().position(|o| *o == right).unwrap_or(0);
                    Question {
                        question: "Which description matches the image?",
                        hint: None,
                        options,
                        answer,
                        category: "attribute_matching",
                        l2: "finegrained_perception (instance-level)",
                    }
                }
            };
            let n = q.options.len();
            for k in 0..n {
                // Copy k: the options rotated left by k, so the right one moves.
                let rotated: Vec<&String> = (0..n).map(|i| &q.options[(i + k) % n]).collect();
                let answer = (q.answer + n - k) % n;
                let letter = (b'A' + answer as u8) as char;
                let cells: Vec<&str> = (0..4)
                    .map(|i| rotated.get(i).map(|s| s.as_str()).unwrap_or(""))
                    .collect();
                let image_cell = if k == 0 {
                    image.clone()
                } else {
                    index.to_string()
                };
                out.push_str(&format!(
                    "{}\t{}\t{}\t{}\t{letter}\t{}\t{}\tdev\t{image_cell}\n",
                    index + k * CIRCULAR_OFFSET,
                    q.question,
                    q.hint.unwrap_or(""),
                    cells.join("\t"),
                    q.category,
                    q.l2,
                ));
            }
        }
    }
    Ok(out)
}

/// A POPE-format TSV: `questions` yes/no questions, alternately about what the
/// image shows and about a shape or colour it does not (categories `shape`, `colour`).
pub fn pope_tsv(seed: u64, questions: usize) -> Result<String> {
    let mut rng = Rng::new(seed).fork(0x706f_7065);
    let mut out = String::from("index\tquestion\tanswer\tcategory\timage\n");
    for i in 0..questions {
        let shape = pick(&Shape::ALL, &mut rng);
        let colour = pick(&Colour::ALL, &mut rng);
        let image = image_base64(shape, colour, &mut rng)?;
        let present = i % 2 == 0;
        let by_shape = (i / 2) % 2 == 0;
        let (asked_shape, asked_colour) = match (present, by_shape) {
            (true, _) => (shape, colour),
            (false, true) => (pick_other(&Shape::ALL, shape, &mut rng), colour),
            (false, false) => (shape, pick_other(&Colour::ALL, colour, &mut rng)),
        };
        out.push_str(&format!(
            "{}\tIs there a {} {} in the image?\t{}\t{}\t{image}\n",
            i + 1,
            asked_colour.name(),
            asked_shape.name(),
            if present { "yes" } else { "no" },
            if by_shape { "shape" } else { "colour" },
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_standard() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"foobar"), "Zm9vYmFy");
    }

    #[test]
    fn mmbench_rows_rotate_options_and_answers() -> Result<()> {
        let tsv = mmbench_tsv(1, 2)?;
        let rows: Vec<Vec<&str>> = tsv
            .lines()
            .skip(1)
            .map(|l| l.split('\t').collect())
            .collect();
        // 2 shape questions x 3 rotations + 2 colour x 4 + 2 matching x 4.
        assert_eq!(rows.len(), 2 * 3 + 2 * 4 + 2 * 4);
        let (first, copy) = (&rows[0], &rows[1]);
        assert_eq!(copy[0], "1000001");
        assert_eq!(
            copy[11], "1",
            "a copy names its original's index instead of the image"
        );
        // The right option's text is the same in both rows.
        let text_of = |r: &Vec<&str>| r[3 + (r[7].as_bytes()[0] - b'A') as usize].to_string();
        assert_eq!(text_of(first), text_of(copy));
        assert_ne!(first[7], copy[7]);
        assert_eq!(mmbench_tsv(1, 2)?, tsv, "deterministic");
        Ok(())
    }

    /// `examples/benchmarks/` holds this generator's output for the default
    /// seed (what `multitoken-datasets --benchmark ... --out FILE` writes).
    #[test]
    fn committed_files_are_the_generators_output() -> Result<()> {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/benchmarks");
        let read = |name: &str| {
            std::fs::read_to_string(dir.join(name)).map_err(|e| crate::io_error(&dir.join(name), e))
        };
        assert!(
            read("shapes-mmbench.tsv")? == mmbench_tsv(7, 20)?,
            "regenerate shapes-mmbench.tsv"
        );
        assert!(
            read("shapes-pope.tsv")? == pope_tsv(7, 40)?,
            "regenerate shapes-pope.tsv"
        );
        Ok(())
    }

    #[test]
    fn pope_is_balanced() -> Result<()> {
        let tsv = pope_tsv(1, 8)?;
        let yes = tsv
            .lines()
            .skip(1)
            .filter(|l| l.split('\t').nth(2) == Some("yes"))
            .count();
        assert_eq!(yes, 4);
        Ok(())
    }
}
