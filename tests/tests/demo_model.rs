//! The embedded demo model (examples/demo-model) answers freshly generated
//! synthetic questions — images, beeps and documents drawn with a seed its
//! training never saw — naming the right shape, colour, count, pitch or topic:
//! in its generator's classic style, in the varied style it was trained on
//! (other phrasings, odd aspect ratios, small shapes anywhere, many kinds of
//! background, off-topic questions, multi-turn chats), and in the unlike style
//! whose phrasings, item nouns and backgrounds it never saw.

use std::path::{Path, PathBuf};

use multitoken_core::{Item, ItemsByKey, Message};
use multitoken_datasets::{generate_split, judge, GenerateConfig, Split, Style, Task};
use multitoken_lm::generate::GenerationParams;
use multitoken_lm::loader::LoadOptions;
use multitoken_lm::multimodal::MultimodalModel;

fn demo_model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/demo-model")
}

/// The greedy answer to a row's last question, given the chat before it.
fn answer(model: &MultimodalModel, row: &multitoken_datasets::Row, base: &Path) -> String {
    let mut items = ItemsByKey::new();
    for (key, paths) in [
        ("images", &row.images),
        ("speech_audios", &row.speech_audios),
        ("documents", &row.documents),
    ] {
        if !paths.is_empty() {
            items.insert(
                key.to_string(),
                paths.iter().map(|p| Item::Path(base.join(p))).collect(),
            );
        }
    }
    let messages: Vec<Message> = row
        .prompt()
        .iter()
        .map(|m| Message {
            role: m.role.clone(),
            content: m.content.clone(),
        })
        .collect();
    let prepared = model.prepare_chat(&messages, &items).unwrap();
    let params = GenerationParams {
        max_new_tokens: 64,
        eos_token_ids: model.lm.generation.eos_token_ids.clone(),
        ..GenerationParams::default()
    };
    model
        .generate(&prepared, &items, &params, &mut |_| true)
        .unwrap()
        .text
        .trim()
        .to_string()
}

/// The model's accuracy on `per_task` fresh rows of each of `tasks` in
/// `style`, drawn with `seed`; the wrong answers listed.
fn accuracy(
    model: &MultimodalModel,
    style: Style,
    seed: u64,
    per_task: usize,
    tasks: Vec<Task>,
) -> (f64, Vec<String>) {
    let dir = std::env::temp_dir().join(format!(
        "multitoken-demo-model-test-{}-{}",
        style.name(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let config = GenerateConfig {
        seed,
        train_per_task: 0,
        heldout_per_task: per_task,
        tasks,
        style,
        ..GenerateConfig::default()
    };
    let rows = generate_split(&dir, Split::Heldout, per_task, &config).unwrap();
    let mut correct = 0;
    let mut wrong = Vec::new();
    for row in &rows {
        let got = answer(model, row, &dir);
        if judge(row.last_answer(), &got) {
            correct += 1;
        } else {
            wrong.push(format!(
                "{}: {:?} -> {got:?} (want {:?})",
                row.id,
                row.prompt().last().map_or("", |m| m.content.as_str()),
                row.last_answer()
            ));
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
    println!(
        "demo model, {} style: {correct}/{} correct",
        style.name(),
        rows.len()
    );
    (correct as f64 / rows.len() as f64, wrong)
}

fn load_demo_model() -> Option<MultimodalModel> {
    if !demo_model_dir().join("multitoken.json").is_file() {
        println!(
            "skipping: {} holds no demo model yet (build it with `cargo xtask demo-model`)",
            demo_model_dir().display()
        );
        return None;
    }
    multitoken_vision::link();
    multitoken_audio::link();
    multitoken_document::link();
    let model = MultimodalModel::load(&demo_model_dir(), &LoadOptions::default()).unwrap();
    assert_eq!(
        model.modality_tokens(),
        vec!["<image>", "<speech>", "<document>"]
    );
    Some(model)
}

/// The demo model's accuracy on `per_task` fresh rows of each of `tasks` in
/// `style` (drawn with `seed`) is at least `floor`; the wrong answers are listed
/// otherwise. Skipped (passes) where the demo model is not built.
fn assert_demo_accuracy(style: Style, seed: u64, per_task: usize, tasks: Vec<Task>, floor: f64) {
    let Some(model) = load_demo_model() else {
        return;
    };
    let (accuracy, wrong) = accuracy(&model, style, seed, per_task, tasks);
    assert!(
        accuracy >= floor,
        "{style:?}: accuracy {accuracy:.3} < {floor}; wrong answers:\n{}",
        wrong.join("\n")
    );
}

/// Every task with its extra (multi-turn, unanswerable) ones.
fn all_tasks() -> Vec<Task> {
    let mut tasks = Task::ALL.to_vec();
    tasks.extend(Task::EXTRA);
    tasks
}

#[test]
fn demo_model_answers_new_synthetic_questions() {
    // A seed the demo model's training (xtask demo_model::SEED) never used.
    assert_demo_accuracy(Style::Classic, 424_242, 8, Task::ALL.to_vec(), MIN_ACCURACY);
}

#[test]
fn demo_model_answers_varied_phrasings_images_and_chats() {
    assert_demo_accuracy(Style::Varied, 515_151, 6, all_tasks(), MIN_ACCURACY);
}

/// Phrasings, item nouns and backgrounds the demo model never saw in training
/// (`Style::Unlike`): it generalises this far, not further.
#[test]
fn demo_model_answers_unlike_phrasings_and_backgrounds() {
    assert_demo_accuracy(Style::Unlike, 626_262, 6, all_tasks(), MIN_UNLIKE_ACCURACY);
}

/// The floor these tests hold the demo model to: its measured held-out accuracy
/// is 100% classic and 93.0% varied (today's generator, whose lists gained twelve
/// batches of phrasings in other registers for phases 12-15 and whose images four more
/// background families for phase 15; examples/demo-model/README.md; 64/64 and 57/60
/// at these seeds); the margin is for the samples of 64 and 60 rows (seven wrong
/// answers fail either).
const MIN_ACCURACY: f64 = 0.9;

/// The floor on the unlike style (today's lists and backgrounds are unlike v9, written
/// before phase 14 was trained): measured 85.0% on 400 rows of v9 (92.0% on v8); 60 rows
/// here, 46 right at this seed (sixteen wrong answers fail).
const MIN_UNLIKE_ACCURACY: f64 = 0.75;
