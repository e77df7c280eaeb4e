//! docs/writing-a-modality.md quotes this crate: every Rust block in it must
//! be a verbatim piece of `src/`, so that the guide's code compiles.

#[test]
fn guide_snippets_are_the_example_code() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let guide = std::fs::read_to_string(root.join("../../docs/writing-a-modality.md")).unwrap();
    let sources: String = ["src/lib.rs", "src/main.rs"]
        .iter()
        .map(|file| std::fs::read_to_string(root.join(file)).unwrap())
        .collect::<Vec<_>>()
        .join("\n");
    let blocks: Vec<&str> = guide
        .split("```rust\n")
        .skip(1)
        .map(|rest| rest.split("```").next().unwrap_or_default())
        .collect();
    assert!(blocks.len() >= 4, "the guide quotes the example's code");
    for block in blocks {
        assert!(sources.contains(block), "not in examples/custom-modality/src:\n{block}");
    }
}
