//! Tests of chat templates: real model templates from `testdata/`, the
//! built-in fallbacks, HF helpers and assistant-turn location.

use super::*;

/// Loads a test tokenizer config from `testdata/chat_templates/{name}.json`.
fn real_template(name: &str) -> Result<ChatTemplate> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("testdata/chat_templates")
        .join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
        path: path.clone(),
        source,
    })?;
    let config: serde_json::Value = serde_json::from_str(&text)
        .map_err(|error| Error::msg(format!("{}: {error}", path.display())))?;
    ChatTemplate::from_tokenizer_config_json(&config)?
        .ok_or_else(|| Error::msg("test config has no template"))
}

/// Messages from `(role, content)` pairs.
fn chat(turns: &[(&str, &str)]) -> Vec<Message> {
    turns
        .iter()
        .map(|(role, content)| Message::new(*role, *content))
        .collect()
}

/// The conversation HF's own template tests use.
fn example_chat() -> Vec<Message> {
    chat(&[
        ("user", "Hello, how are you?"),
        ("assistant", "I'm doing great. How can I help you today?"),
        ("user", "I'd like to show off how chat templating works!"),
    ])
}

/// Renders `messages` as a conversation and as a prompt, and checks the
/// assistant ranges' text.
fn check(
    template: &ChatTemplate,
    messages: &[Message],
    conversation: &str,
    prompt: &str,
    assistant_texts: &[&str],
) -> Result<()> {
    assert_eq!(
        template.render_conversation(messages)?,
        conversation,
        "conversation of {}",
        template.name()
    );
    assert_eq!(
        template.render_prompt(messages)?,
        prompt,
        "prompt of {}",
        template.name()
    );
    let rendered = template.render_with_assistant_spans(messages)?;
    assert_eq!(rendered.text, conversation);
    let texts: Vec<&str> = rendered
        .assistant_ranges
        .iter()
        .map(|range| &rendered.text[range.clone()])
        .collect();
    assert_eq!(
        texts,
        assistant_texts,
        "assistant turns of {}",
        template.name()
    );
    Ok(())
}

#[test]
fn smollm2_adds_its_default_system_prompt() -> Result<()> {
    let template = real_template("smollm2")?;
    assert_eq!(
        (template.bos_token(), template.eos_token()),
        ("<|im_start|>", "<|im_end|>")
    );
    let system = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n";
    check(
        &template,
        &chat(&[("user", "Describe <image>"), ("assistant", "A potato."), ("user", "And <image>?")]),
        &format!(
            "{system}<|im_start|>user\nDescribe <image><|im_end|>\n<|im_start|>assistant\nA potato.<|im_end|>\n\
             <|im_start|>user\nAnd <image>?<|im_end|>\n"
        ),
        &format!(
            "{system}<|im_start|>user\nDescribe <image><|im_end|>\n<|im_start|>assistant\nA potato.<|im_end|>\n\
             <|im_start|>user\nAnd <image>?<|im_end|>\n<|im_start|>assistant\n"
        ),
        &["A potato.<|im_end|>"],
    )?;
    check(
        &template,
        &chat(&[("system", "Be terse."), ("user", "Hi"), ("assistant", "Hello.")]),
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n",
        "<|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n\
         <|im_start|>assistant\n",
        &["Hello.<|im_end|>"],
    )
}

#[test]
fn qwen2_is_chatml_with_its_own_system_prompt() -> Result<()> {
    let template = real_template("qwen2")?;
    assert_eq!(
        (template.bos_token(), template.eos_token()),
        ("", "<|im_end|>")
    );
    check(
        &template,
        &chat(&[("user", "Hi"), ("assistant", "Hello!"), ("user", "Bye"), ("assistant", "Bye!")]),
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
         <|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\nBye!<|im_end|>\n",
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
         <|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\nBye!<|im_end|>\n\
         <|im_start|>assistant\n",
        &["Hello!<|im_end|>", "Bye!<|im_end|>"],
    )
}

#[test]
fn mistral_matches_transformers_output() -> Result<()> {
    let template = real_template("mistral")?;
    // The target is the one transformers' own template tests record.
    let expected =
        "<s>[INST] Hello, how are you? [/INST]I'm doing great. How can I help you today?</s>\
                    [INST] I'd like to show off how chat templating works! [/INST]";
    check(
        &template,
        &example_chat(),
        expected,
        expected,
        &["I'm doing great. How can I help you today?</s>"],
    )
}

#[test]
fn llama2_matches_transformers_output() -> Result<()> {
    let template = real_template("llama2")?;
    // bos/eos come as AddedToken objects in Llama-2's tokenizer_config.json.
    assert_eq!(
        (template.bos_token(), template.eos_token()),
        ("<s>", "</s>")
    );
    let mut messages = vec![Message::system(
        "You are a friendly chatbot who always responds in the style of a pirate",
    )];
    messages.extend(example_chat());
    let expected = "<s>[INST] <<SYS>>\nYou are a friendly chatbot who always responds in the style of a pirate\n<</SYS>>\n\n\
                    Hello, how are you? [/INST] I'm doing great. How can I help you today? </s>\
                    <s>[INST] I'd like to show off how chat templating works! [/INST]";
    check(
        &template,
        &messages,
        expected,
        expected,
        &[" I'm doing great. How can I help you today? </s>"],
    )
}

/// Renders with `template` and returns the error text, or the output.
fn render_outcome(template: &ChatTemplate, messages: &[Message]) -> String {
    match template.render_conversation(messages) {
        Ok(text) => format!("ok {text}"),
        Err(error) => error.to_string(),
    }
}

#[test]
fn raise_exception_becomes_a_template_error() -> Result<()> {
    let template = real_template("mistral")?;
    let outcome = render_outcome(&template, &chat(&[("user", "a"), ("user", "b")]));
    assert!(
        outcome.starts_with("chat template `tokenizer_config.json chat_template`"),
        "{outcome}"
    );
    assert!(
        outcome.contains("Conversation roles must alternate user/assistant/user/assistant/..."),
        "{outcome}"
    );
    let outcome = render_outcome(&template, &chat(&[("user", "u"), ("system", "s")]));
    assert!(
        outcome.contains("Only user and assistant roles are supported!"),
        "{outcome}"
    );
    Ok(())
}

#[test]
fn builtin_templates_render_their_formats() -> Result<()> {
    let exchange = chat(&[("user", "Hi"), ("assistant", "Hello")]);
    check(
        &ChatTemplate::builtin("mistral")?,
        &chat(&[
            ("system", "Be brief"),
            ("user", "Hi"),
            ("assistant", "Hello"),
        ]),
        "<s>[INST] Be brief\n\nHi [/INST]Hello</s>",
        "<s>[INST] Be brief\n\nHi [/INST]Hello</s>",
        &["Hello</s>"],
    )?;
    check(
        &ChatTemplate::builtin("chatml")?,
        &exchange,
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n",
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>assistant\n",
        &["Hello<|im_end|>"],
    )?;
    check(
        &ChatTemplate::builtin("llama-2")?,
        &chat(&[("system", "Sys"), ("user", "Hi"), ("assistant", "Hello")]),
        "<s>[INST] <<SYS>>\nSys\n<</SYS>>\n\nHi [/INST] Hello </s>",
        "<s>[INST] <<SYS>>\nSys\n<</SYS>>\n\nHi [/INST] Hello </s>",
        &[" Hello </s>"],
    )?;
    check(
        &ChatTemplate::builtin("idefics2")?,
        &chat(&[("user", "<image>What is it?"), ("assistant", "A cat.")]),
        "User:<image>What is it?<end_of_utterance>\nAssistant: A cat.<end_of_utterance>\n",
        "User:<image>What is it?<end_of_utterance>\nAssistant: A cat.<end_of_utterance>\nAssistant:",
        &[" A cat.<end_of_utterance>"],
    )?;
    check(
        &ChatTemplate::builtin("phi2")?,
        &exchange,
        "Instruct: Hi\nOutput: Hello<|endoftext|>\n",
        "Instruct: Hi\nOutput: Hello<|endoftext|>\nOutput:",
        &[" Hello<|endoftext|>"],
    )?;
    assert_eq!(
        ChatTemplate::builtin("idefics2")?.render_prompt(&chat(&[("user", "Describe it")]))?,
        "User: Describe it<end_of_utterance>\nAssistant:"
    );
    assert_eq!(
        ChatTemplate::builtin("phi-2")?.render_prompt(&chat(&[("user", "Hi")]))?,
        "Instruct: Hi\nOutput:"
    );
    let unknown = ChatTemplate::builtin("vicuna")
        .err()
        .map(|error| error.to_string());
    assert_eq!(
        unknown.as_deref(),
        Some("no built-in chat template named `vicuna`; built-in templates: mistral, chatml, llama2, idefics2, phi2")
    );
    Ok(())
}

#[test]
fn python_methods_and_filters_work() -> Result<()> {
    let source = "{% for message in messages %}{% for key, value in message.items() %}{{ key }}={{ value.strip() | tojson }};{% endfor %}\
                  {{ message.content.startswith('  <') }} {{ message['content'].split() | length }} {{ message.role.upper() }}{% endfor %}";
    let template = ChatTemplate::new("pycompat", source, "", "")?;
    assert_eq!(
        template.render_conversation(&chat(&[("user", "  <a> b  ")]))?,
        r#"role="user";content="<a> b";True 2 USER"#
    );
    let json = ChatTemplate::new(
        "tojson",
        "{{ {'b': [1, 'x'], 'a': {'c': none}} | tojson }}|{{ {'a': 1} | tojson(indent=2) }}",
        "",
        "",
    )?;
    assert_eq!(
        json.render_conversation(&[])?,
        "{\"b\": [1, \"x\"], \"a\": {\"c\": null}}|{\n  \"a\": 1\n}"
    );
    Ok(())
}

#[test]
fn generation_markers_are_ignored() -> Result<()> {
    let source = "{% for m in messages %}{{ m.role }}: {% if m.role == 'assistant' %}{% generation %}{{ m.content + eos_token }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}{{ '\n' }}{% endfor %}";
    let template = ChatTemplate::new("marked", source, "", "<eos>")?;
    let rendered =
        template.render_with_assistant_spans(&chat(&[("user", "q"), ("assistant", "a")]))?;
    assert_eq!(rendered.text, "user: q\nassistant: a<eos>\n");
    // The space before the content is labelled with it (" a<eos>"), as BPE merges it into the word.
    assert_eq!(rendered.assistant_ranges, vec![18..25]);
    Ok(())
}

/// Found by the `chat_template` fuzz target: `{%}` (the opening and closing
/// marks overlapping) panicked while generation markers were stripped; it is a
/// template syntax error like any other.
#[test]
fn overlapping_tag_marks_are_a_syntax_error() {
    for source in ["{%}", "a {%} b {% generation %}", "{%}{% endgeneration %}{{ 1 }}"] {
        let outcome = std::panic::catch_unwind(|| ChatTemplate::new("odd", source, "", ""));
        assert!(outcome.is_ok(), "{source:?} panicked");
    }
    assert!(ChatTemplate::new("odd", "{%}", "", "").is_err());
}

#[test]
fn templates_that_rewrite_history_fall_back_to_searching_content() -> Result<()> {
    // EOS only after the very last message, so the rendering of a prefix of the
    // conversation is not a prefix of the whole rendering.
    let source = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if not add_generation_prompt and messages and messages[-1].role == 'assistant' %}{{ eos_token }}{% endif %}";
    let template = ChatTemplate::new("eos-at-end", source, "", "</s>")?;
    let rendered = template.render_with_assistant_spans(&chat(&[
        ("user", "q1"),
        ("assistant", "a1"),
        ("user", "q2"),
        ("assistant", "a2"),
    ]))?;
    let texts: Vec<&str> = rendered
        .assistant_ranges
        .iter()
        .map(|range| &rendered.text[range.clone()])
        .collect();
    assert_eq!(texts, vec!["a1", "a2</s>"]);

    // A template that both rewrites history and hides the content cannot be labelled.
    let hides = ChatTemplate::new(
        "hides",
        "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% else %}[hidden]{% endif %}{% endfor %}\
         {% if not add_generation_prompt %}{{ eos_token }}{% endif %}",
        "",
        "</s>",
    )?;
    let error = hides
        .render_with_assistant_spans(&chat(&[
            ("user", "q"),
            ("assistant", "secret"),
            ("user", "q2"),
            ("assistant", "s2"),
        ]))
        .err()
        .map(|e| e.to_string());
    assert_eq!(
        error.as_deref(),
        Some("chat template `hides`: cannot locate assistant message 1 in the rendered conversation (the template rewrites it), so its labels cannot be set")
    );
    Ok(())
}

/// A fresh directory under the system temp dir for one test.
fn scratch_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("multitoken-core-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn model_dirs_and_tokenizer_configs() -> Result<()> {
    let dir = scratch_dir("template-dir");
    assert!(
        ChatTemplate::from_model_dir(&dir)?.is_none(),
        "an empty dir has no template"
    );

    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"bos_token": "<s>", "eos_token": {"content": "</s>"}}"#,
    )
    .unwrap();
    assert!(
        ChatTemplate::from_model_dir(&dir)?.is_none(),
        "a config without chat_template has none"
    );

    let listed = serde_json::json!({
        "eos_token": "</s>",
        "chat_template": [
            {"name": "tool_use", "template": "tools"},
            {"name": "default", "template": "{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}"}
        ]
    });
    std::fs::write(dir.join("tokenizer_config.json"), listed.to_string()).unwrap();
    let template =
        ChatTemplate::from_model_dir(&dir)?.ok_or_else(|| Error::msg("expected a template"))?;
    assert_eq!(
        template.render_conversation(&chat(&[("user", "x")]))?,
        "x</s>"
    );

    // chat_template.jinja wins over tokenizer_config.json; BOS/EOS still come from the config.
    std::fs::write(
        dir.join("chat_template.jinja"),
        "{{ bos_token }}{{ messages[0].content }}{{ eos_token }}\n",
    )
    .unwrap();
    let template =
        ChatTemplate::from_model_dir(&dir)?.ok_or_else(|| Error::msg("expected a template"))?;
    assert_eq!(
        template.render_conversation(&chat(&[("user", "y")]))?,
        "y</s>",
        "no bos in this config, trailing newline dropped"
    );

    std::fs::write(dir.join("tokenizer_config.json"), "{ not json").unwrap();
    let error = ChatTemplate::from_model_dir(&dir)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        error.contains("tokenizer_config.json") && error.contains("key must be a string"),
        "{error}"
    );

    let bad_kind =
        ChatTemplate::from_tokenizer_config_json(&serde_json::json!({"chat_template": 3}))
            .err()
            .map(|e| e.to_string());
    assert_eq!(
        bad_kind.as_deref(),
        Some("tokenizer_config.json: `chat_template` must be a string or a list of {name, template}, got 3")
    );
    let syntax = ChatTemplate::from_tokenizer_config_json(
        &serde_json::json!({"chat_template": "{% for %}"}),
    )
    .err()
    .map(|e| e.to_string());
    assert!(
        syntax
            .as_deref()
            .is_some_and(|e| e
                .starts_with("chat template `tokenizer_config.json chat_template`: syntax error")),
        "{syntax:?}"
    );
    std::fs::remove_dir_all(&dir).ok();
    Ok(())
}

#[test]
fn strftime_subset_formats_utc_dates() {
    assert_eq!(format_utc(0, "%d %b %Y"), "01 Jan 1970");
    assert_eq!(
        format_utc(1_700_000_000, "%Y-%m-%d %H:%M:%S %B %e %%"),
        "2023-11-14 22:13:20 November 14 %"
    );
    assert_eq!(format_utc(951_782_400, "%d %B %Y"), "29 February 2000");
}

#[test]
fn messages_round_trip_through_json() -> Result<()> {
    let message: Message =
        serde_json::from_str(r#"{"role": "user", "content": "Describe <image>"}"#)
            .map_err(|error| Error::msg(error.to_string()))?;
    assert_eq!(message, Message::user("Describe <image>"));
    assert!(Message::assistant("x").is_assistant());
    Ok(())
}

#[test]
fn templates_of_typed_parts_get_content_split_at_modality_tokens() -> Result<()> {
    // Idefics2's processor template reads `message['content']` as typed parts.
    let source = "{% for message in messages %}{{message['role'].capitalize()}}{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}";
    let template = ChatTemplate::new("idefics2 processor", source, "<s>", "</s>")?;
    let rendered = template.render_prompt(&[Message::user("<image>Describe."), Message::assistant("A cat."), Message::user("And <image><image>?")])?;
    assert_eq!(rendered, "User:<image>Describe.<end_of_utterance>\nAssistant: A cat.<end_of_utterance>\nUser: And <image><image>?<end_of_utterance>\nAssistant:");
    Ok(())
}

/// Hostile templates (issue 23): a nested loop that would run for hours,
/// text doubled in a loop (6 GB before the limit), unbounded recursion and a
/// huge `range` end in clear errors in bounded time and memory; real
/// templates render long conversations within the budget.
#[test]
fn runaway_templates_end_in_clear_errors() -> Result<()> {
    let cases = [
        (
            "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
            "went over its budget",
        ),
        (
            "{% set s = namespace(v='ab') %}{% for i in range(40) %}{% set s.v = s.v ~ s.v %}{% endfor %}{{ s.v }}",
            "went over its budget",
        ),
        (
            "{% for i in range(100) %}{{ messages[0]['content'] * 1000000 }}{% endfor %}",
            "went over its budget",
        ),
        (
            "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
            "recursion limit exceeded",
        ),
    ];
    let messages = chat(&[("user", "hello")]);
    for (source, want) in cases {
        let template = ChatTemplate::new("hostile.jinja", source, "", "")?;
        let outcome = render_outcome(&template, &messages);
        assert!(
            outcome.starts_with("chat template `hostile.jinja`") && outcome.contains(want),
            "{source}: {outcome}"
        );
    }
    // A long conversation with a real template: 200 turns of 2 KB each.
    let template = real_template("mistral")?;
    let long: Vec<(&str, String)> = (0..200)
        .map(|i| (if i % 2 == 0 { "user" } else { "assistant" }, "word ".repeat(400)))
        .collect();
    let turns: Vec<(&str, &str)> = long.iter().map(|(r, c)| (*r, c.as_str())).collect();
    let outcome = render_outcome(&template, &chat(&turns));
    assert!(outcome.starts_with("ok "), "{}", &outcome[..outcome.len().min(300)]);
    Ok(())
}
