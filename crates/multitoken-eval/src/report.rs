//! `report.json`, `report.md` and `accuracy.png`: the overall score, per
//! category, per sub-category and per split (score, count, unparsed), the
//! benchmark's extra metrics, notes, and every question's line.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use crate::chart::{render, Bar};
use crate::score::{mean, Scored, Scores};
use crate::{Benchmark, Error, Result};

/// The name of the chart file in the output directory.
pub const CHART_FILE: &str = "accuracy.png";

/// Score of a group of questions.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Group {
    /// Mean score in [0, 1].
    pub score: f64,
    /// Questions.
    pub n: usize,
    /// Questions whose answer could not be read.
    pub unparsed: usize,
}

/// Everything `eval` reports.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Benchmark name.
    pub benchmark: String,
    /// The benchmark file.
    pub data: String,
    /// The model directory, when it answered here.
    pub model: Option<String>,
    /// Overall score in [0, 1] (MMBench: CircularEval accuracy; POPE: accuracy;
    /// MMMU: instance-weighted accuracy; VQAv2: mean VQA accuracy).
    pub score: f64,
    /// Questions scored (MMBench: originals, each with its copies).
    pub n: usize,
    /// Questions whose answer could not be read.
    pub unparsed: usize,
    /// By category (MMBench `l2-category`, MMMU domain, POPE `category`, VQA `answer_type`).
    pub by_category: BTreeMap<String, Group>,
    /// By sub-category (MMBench `category`, MMMU subject, VQA `question_type`).
    pub by_sub_category: BTreeMap<String, Group>,
    /// By `split`, when rows have one.
    pub by_split: BTreeMap<String, Group>,
    /// Extra metrics (POPE's precision, recall, F1, yes-ratio; MMBench's `vanilla_all`).
    pub metrics: BTreeMap<String, f64>,
    /// Warnings.
    pub notes: Vec<String>,
    /// Every question.
    pub rows: Vec<Scored>,
}

fn group_by(rows: &[Scored], key: impl Fn(&Scored) -> Option<&String>) -> BTreeMap<String, Group> {
    let mut groups: BTreeMap<String, Vec<&Scored>> = BTreeMap::new();
    for r in rows {
        if let Some(k) = key(r) {
            groups.entry(k.clone()).or_default().push(r);
        }
    }
    groups
        .into_iter()
        .map(|(k, v)| {
            let g = Group {
                score: mean(v.iter().map(|r| r.score)),
                n: v.len(),
                unparsed: v.iter().filter(|r| r.unparsed).count(),
            };
            (k, g)
        })
        .collect()
}

impl Report {
    /// Aggregates `scores`.
    pub fn build(benchmark: Benchmark, data: &Path, model: Option<&Path>, scores: Scores) -> Self {
        let rows = scores.rows;
        Self {
            benchmark: benchmark.name().to_string(),
            data: data.display().to_string(),
            model: model.map(|m| m.display().to_string()),
            score: mean(rows.iter().map(|r| r.score)),
            n: rows.len(),
            unparsed: rows.iter().filter(|r| r.unparsed).count(),
            by_category: group_by(&rows, |r| r.category.as_ref()),
            by_sub_category: group_by(&rows, |r| r.sub_category.as_ref()),
            by_split: group_by(&rows, |r| r.split.as_ref()),
            metrics: scores.metrics,
            notes: scores.notes,
            rows,
        }
    }

    /// `{"benchmark", "score", "n", "by_category": {name: score}}`: the last
    /// stdout line of `eval --json`.
    pub fn summary_json(&self) -> serde_json::Value {
        let by_category: serde_json::Map<String, serde_json::Value> = self
            .by_category
            .iter()
            .map(|(k, g)| (k.clone(), serde_json::json!(g.score)))
            .collect();
        serde_json::json!({
            "benchmark": self.benchmark,
            "score": self.score,
            "n": self.n,
            "unparsed": self.unparsed,
            "by_category": by_category,
            "metrics": self.metrics,
        })
    }

    /// The Markdown report.
    pub fn markdown(&self) -> String {
        let pct = |x: f64| format!("{:.2}%", 100.0 * x);
        let mut md = format!("# {} evaluation\n\n", self.benchmark);
        md.push_str(&format!("- data: `{}`\n", self.data));
        if let Some(m) = &self.model {
            md.push_str(&format!("- model: `{m}`\n"));
        }
        md.push_str(&format!(
            "- score: **{}** over {} questions ({} unparsed)\n\n",
            pct(self.score),
            self.n,
            self.unparsed
        ));
        if !self.metrics.is_empty() {
            md.push_str("| metric | value |\n|---|---|\n");
            for (k, v) in &self.metrics {
                md.push_str(&format!("| {k} | {} |\n", pct(*v)));
            }
            md.push('\n');
        }
        for (title, groups) in [
            ("category", &self.by_category),
            ("sub-category", &self.by_sub_category),
            ("split", &self.by_split),
        ] {
            if groups.is_empty() {
                continue;
            }
            md.push_str(&format!(
                "## By {title}\n\n| {title} | score | n | unparsed |\n|---|---|---|---|\n"
            ));
            for (k, g) in groups {
                md.push_str(&format!(
                    "| {} | {} | {} | {} |\n",
                    k.replace('|', "\\|"),
                    pct(g.score),
                    g.n,
                    g.unparsed
                ));
            }
            md.push('\n');
        }
        if !self.notes.is_empty() {
            md.push_str("## Notes\n\n");
            for n in &self.notes {
                md.push_str(&format!("- {n}\n"));
            }
            md.push('\n');
        }
        md.push_str(&format!(
            "Per-question results: `report.json` (`rows`). Chart: `{CHART_FILE}`.\n"
        ));
        md
    }

    /// Writes `report.json`, `report.md` and the chart into `dir`.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let json = serde_json::to_string_pretty(self)
            .map_err(|e| Error::Config(format!("report.json: {e}")))?;
        write_atomic(&dir.join("report.json"), json.as_bytes())?;
        write_atomic(&dir.join("report.md"), self.markdown().as_bytes())?;
        let overall = Bar {
            label: "overall".into(),
            value: self.score,
            n: self.n,
        };
        let bars: Vec<Bar> = self
            .by_category
            .iter()
            .map(|(k, g)| Bar {
                label: k.clone(),
                value: g.score,
                n: g.n,
            })
            .collect();
        let title = format!("{} accuracy by category", self.benchmark);
        let img = render(&title, &overall, &bars);
        let path = dir.join(CHART_FILE);
        let mut png = std::io::Cursor::new(Vec::new());
        img.write_to(&mut png, image::ImageFormat::Png)
            .map_err(|e| {
                Error::Config(format!("{}: cannot encode the chart: {e}", path.display()))
            })?;
        write_atomic(&path, &png.into_inner())
    }
}

/// Writes through a temporary file and a rename, so a reader never sees half a file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}
