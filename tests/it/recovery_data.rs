//! Recovery data and evaluation parity (issue 17, items 4 and 5): `data_format: answers`
//! on one real item of each task's format, packing (no token lost or duplicated, EOS
//! between documents, rows of exactly `cutoff_len`) alone and inside `finetune`, and
//! `eval.bos` defaulting to what the model folder's tokenizer does, with `--bos` on
//! `recover eval`. (The GGUF side of the BOS default is in the `gguf` module.)

use crate::common::*;
use rora::adapters::{self, AttachSpec};
use rora::data::{self, DataFormat, InstructionItem};
use rora::eval::{run_eval, EvalSpec, Protocol};
use rora::model::{self, ModelSource, TextTokenizer};
use rora::train::{self, FinetuneSpec, Objective};
use std::path::Path;

/// One real item of each task's format: the first of each training set (PIQA and
/// HellaSwag have none here, so the first of their test files' format), with the
/// sentence `data_format: answers` must make of it.
fn fixtures() -> Vec<(&'static str, InstructionItem, &'static str)> {
    let item = |instruction: &str, answer: &str| InstructionItem {
        instruction: instruction.to_string(),
        input: String::new(),
        output: format!("the correct answer is {answer}"),
        answer: Some(answer.to_string()),
    };
    vec![
        (
            "boolq",
            item(
                "Please answer the following question with true or false, question: do iran and afghanistan speak the same language?\n\nAnswer format: true/false",
                "true",
            ),
            "Do iran and afghanistan speak the same language? Yes.",
        ),
        (
            "piqa",
            item(
                "Please choose the correct solution to the question: How do I ready a guinea pig cage for it's new occupants?\n\nSolution1: Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, you will also need to supply it with a water bottle and a food dish.\n\nSolution2: Provide the guinea pig with a cage full of a few inches of bedding made of ripped jeans material, you will also need to supply it with a water bottle and a food dish.\n\nAnswer format: solution1/solution2",
                "solution1",
            ),
            "How do I ready a guinea pig cage for it's new occupants? Provide the guinea pig with a cage full of a few inches of bedding made of ripped paper strips, you will also need to supply it with a water bottle and a food dish.",
        ),
        (
            "social_i_qa",
            item(
                "Please choose the correct answer to the question: Cameron decided to have a barbecue and gathered her friends together. How would Others feel as a result?\n\nAnswer1: like attending Answer2: like staying home Answer3: a good friend to have\n\nAnswer format: answer1/answer2/answer3",
                "answer1",
            ),
            "Cameron decided to have a barbecue and gathered her friends together. How would Others feel as a result? Like attending.",
        ),
        (
            "hellaswag",
            item(
                "Please choose the correct ending to complete the given sentence: Roof shingle removal: A man is sitting on a roof. he\n\nEnding1: is using wrap to wrap a pair of skis. Ending2: is ripping level tiles off. Ending3: is holding a rubik's cube. Ending4: starts pulling up roofing on a roof.\n\nAnswer format: ending1/ending2/ending3/ending4",
                "ending4",
            ),
            "Roof shingle removal: A man is sitting on a roof. he starts pulling up roofing on a roof.",
        ),
        (
            "winogrande",
            item(
                "Please choose the correct answer to fill in the blank to complete the given sentence: Ian volunteered to eat Dennis's menudo after already having a bowl because _ despised eating intestine.\n\nOption1: Ian Option2: Dennis Answer format: option1/option2",
                "option2",
            ),
            "Ian volunteered to eat Dennis's menudo after already having a bowl because Dennis despised eating intestine.",
        ),
        (
            "ARC-Easy",
            item(
                "Please choose the correct answer to the question: Which factor will most likely cause a person to develop a fever?\n\nAnswer1: a leg muscle relaxing after exercise Answer2: a bacterial population in the bloodstream Answer3: several viral particles on the skin Answer4: carbohydrates being digested in the stomach\n\nAnswer format: answer1/answer2/answer3/answer4",
                "answer2",
            ),
            "Which factor will most likely cause a person to develop a fever? A bacterial population in the bloodstream.",
        ),
        (
            "ARC-Challenge",
            item(
                "Please choose the correct answer to the question: George wants to warm his hands quickly by rubbing them. Which skin surface will produce the most heat?\n\nAnswer1: dry palms Answer2: wet palms Answer3: palms covered with oil Answer4: palms covered with lotion\n\nAnswer format: answer1/answer2/answer3/answer4",
                "answer1",
            ),
            "George wants to warm his hands quickly by rubbing them. Which skin surface will produce the most heat? Dry palms.",
        ),
        (
            "openbookqa",
            item(
                "Please choose the correct answer to the question: The sun is responsible for\n\nAnswer1: puppies learning new tricks Answer2: children growing up and getting old Answer3: flowers wilting in a vase Answer4: plants sprouting, blooming and wilting\n\nAnswer format: answer1/answer2/answer3/answer4",
                "answer4",
            ),
            "The sun is responsible for plants sprouting, blooming and wilting.",
        ),
    ]
}

#[test]
fn answers_format_writes_each_task_as_its_sentence() {
    for (task, item, expected) in fixtures() {
        assert_eq!(data::answer_text(&item).unwrap(), expected, "{task}");
    }
}

/// Every item of the six training sets converts, and WinoGrande's blanks are all filled.
#[test]
fn every_training_item_converts() {
    let dir = shared_dir().join("data/commonsense");
    let files = [
        "boolq/train.json",
        "social_i_qa/train.json",
        "winogrande/train_l.json",
        "ARC-Easy/train.json",
        "ARC-Challenge/train.json",
        "openbookqa/train.json",
    ];
    for file in files {
        let items = data::read_instruction_file(&dir.join(file)).unwrap();
        for (i, item) in items.iter().enumerate() {
            let text = data::answer_text(item).unwrap_or_else(|e| panic!("{file} item {i}: {e}"));
            assert!(!text.contains("Answer1:") && !text.contains("Please choose"));
            if file.starts_with("winogrande") {
                assert!(!text.contains('_'), "{file} item {i}: {text}");
            }
        }
    }
}

#[test]
fn answers_examples_are_all_targets_and_follow_the_tokenizer_bos() {
    let tok = load_stories().tokenizer; // stories260K adds BOS
    let (_, item, expected) = fixtures().swap_remove(7);
    let e = data::item_example(&tok, &item, DataFormat::Answers, 256, true).unwrap();
    let mut ids = vec![1];
    ids.extend(tok.encode(expected, false).unwrap());
    ids.push(2);
    assert_eq!(e.ids, ids);
    assert!(!e.targets[0] && e.targets[1..].iter().all(|&t| t));
    let no_bos = tok.clone().with_add_bos(false);
    let e = data::item_example(&no_bos, &item, DataFormat::Answers, 256, true).unwrap();
    assert_eq!(e.ids, ids[1..]);
    // The default format is today's instruction prompt, whatever the tokenizer default.
    let a = data::item_example(&no_bos, &item, DataFormat::Instructions, 256, true).unwrap();
    let b = data::instruction_example(&tok, &item, 256, true).unwrap();
    assert_eq!(a, b);
}

/// Checks `packed` against `documents` and `eos`: the rows, in order, followed by the
/// dropped tail, are exactly the documents each followed by one EOS (nothing lost,
/// nothing duplicated), every row has `row_len` tokens and every position is a target.
fn check_packing(documents: &[Vec<u32>], eos: u32, row_len: usize, packed: &data::Packed) {
    let mut expected = Vec::new();
    for d in documents {
        expected.extend_from_slice(d);
        if d.last() != Some(&eos) {
            expected.push(eos);
        }
    }
    assert_eq!(packed.stream_tokens, expected.len());
    assert_eq!(packed.rows.len(), expected.len() / row_len);
    assert_eq!(packed.dropped_tokens, expected.len() % row_len);
    let mut got: Vec<u32> = Vec::new();
    for row in &packed.rows {
        assert_eq!(row.ids.len(), row_len);
        assert_eq!(row.targets, vec![true; row_len]);
        got.extend_from_slice(&row.ids);
    }
    got.extend_from_slice(&expected[got.len()..]);
    assert_eq!(got, expected);
    // Split at EOS, the stream gives the documents back.
    let docs: Vec<Vec<u32>> = expected
        .split(|&t| t == eos)
        .filter(|d| !d.is_empty())
        .map(<[u32]>::to_vec)
        .collect();
    let trimmed: Vec<Vec<u32>> = documents
        .iter()
        .map(|d| d.strip_suffix(&[eos]).unwrap_or(d).to_vec())
        .collect();
    assert_eq!(docs, trimmed);
}

#[test]
fn packing_keeps_every_token_once_with_eos_between() {
    // Hand-made: the last document already ends with EOS (2) and gets no second one.
    let docs = vec![vec![1, 5, 6], vec![1, 7], vec![1, 8, 9, 10, 2]];
    let packed = data::pack(&docs, 2, 5);
    assert_eq!(packed.rows[0].ids, [1, 5, 6, 2, 1]);
    assert_eq!(packed.rows[1].ids, [7, 2, 1, 8, 9]);
    assert_eq!((packed.stream_tokens, packed.dropped_tokens), (12, 2));
    check_packing(&docs, 2, 5, &packed);
    // An exact multiple drops nothing.
    let packed = data::pack(&docs, 2, 6);
    assert_eq!((packed.rows.len(), packed.dropped_tokens), (2, 0));
    check_packing(&docs, 2, 6, &packed);

    // The eight fixtures tokenised, in both formats, at several row lengths.
    let tok = load_stories().tokenizer;
    let eos = tok.eos_ids()[0];
    for format in [DataFormat::Instructions, DataFormat::Answers] {
        let docs: Vec<Vec<u32>> = fixtures()
            .iter()
            .map(|(_, item, _)| data::item_document(&tok, item, format).unwrap())
            .collect();
        for row_len in [7, 32, 128] {
            check_packing(&docs, eos, row_len, &data::pack(&docs, eos, row_len));
        }
    }
}

fn yaml<T: serde::de::DeserializeOwned>(text: &str) -> T {
    serde_yaml_ng::from_str(text).unwrap()
}

/// Writes the fixtures as a training file and a short text file into `dir`.
fn write_training_data(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let items: Vec<serde_json::Value> = fixtures()
        .iter()
        .map(|(_, i, _)| {
            serde_json::json!({"instruction": i.instruction, "input": "", "output": i.output,
                               "answer": i.answer})
        })
        .collect();
    let data = dir.join("train.json");
    std::fs::write(&data, serde_json::to_string(&items).unwrap()).unwrap();
    let text = dir.join("story.txt");
    std::fs::write(
        &text,
        "Once upon a time, there was a little girl named Lily. She liked to play in the park \
         with her dog. One day the dog found a big red ball under a tree.",
    )
    .unwrap();
    (data, text)
}

/// `finetune` with `packing: true` over JSON items (answers) and a text file trains on
/// rows of exactly cutoff_len tokens: as many rows as the stream has, every step
/// `batch_size × cutoff_len` real tokens.
#[test]
fn finetune_packs_items_and_text_into_full_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let (data_path, text_path) = write_training_data(tmp.path());
    let loaded = load_stories();
    let tok = &loaded.tokenizer;
    let mut model = loaded.model;
    let attach: AttachSpec = yaml("method: rora\nrank: 4\nalpha: 8\ndropout: 0.0");
    adapters::attach(&mut model, &attach, 0).unwrap();
    let (cutoff, batch, steps) = (17, 2, 3); // 17: the stream leaves a partial row
    let spec: FinetuneSpec = yaml(&format!(
        "data: [{}]\ntext: [{}]\ndata_format: answers\npacking: true\ncutoff_len: {cutoff}\n\
         batch_size: {batch}\nmicro_batch_size: {batch}\nval_set_size: 1\nwarmup_steps: 0\n\
         max_steps: {steps}",
        data_path.display(),
        text_path.display()
    ));
    // The stream, built here from the tokenizer: each document and one EOS.
    let mut stream_len = 0;
    for (_, _, sentence) in fixtures() {
        stream_len += tok.encode(sentence, tok.add_bos()).unwrap().len() + 1;
    }
    let story = std::fs::read_to_string(&text_path).unwrap();
    stream_len += tok.encode(&story, true).unwrap().len() + 1;

    let run_dir = tmp.path().join("run");
    std::fs::create_dir_all(&run_dir).unwrap();
    let report = train::finetune(
        &mut model,
        tok,
        &spec,
        Objective::NextToken,
        0,
        &run_dir,
        false,
    )
    .unwrap();
    assert_eq!(
        report.train_examples + report.val_examples,
        stream_len / cutoff
    );
    assert_eq!(report.tokens, (steps * batch * cutoff) as u64);

    // Bad combinations and test files are refused before any work.
    let mut with = |extra: &str, data: &Path| -> String {
        let spec: FinetuneSpec = yaml(&format!(
            "data: [{}]\nmax_steps: 1\n{extra}",
            data.display()
        ));
        let e = train::finetune(
            &mut model,
            tok,
            &spec,
            Objective::NextToken,
            0,
            &run_dir,
            false,
        )
        .unwrap_err();
        format!("{e:#}")
    };
    let e = with("packing: true\ntrain_on_inputs: false", &data_path);
    assert!(
        e.contains("packing") && e.contains("train_on_inputs"),
        "{e}"
    );
    let e = with("data_format: answers\ntrain_on_inputs: false", &data_path);
    assert!(
        e.contains("answers") && e.contains("train_on_inputs"),
        "{e}"
    );
    let test_file = tmp.path().join("test.json");
    std::fs::copy(&data_path, &test_file).unwrap();
    let e = with("data_format: answers", &test_file);
    assert!(e.contains("test.json") && e.contains("test file"), "{e}");
    let e = with("packing: true\ncutoff_len: 4096", &data_path);
    assert!(e.contains("fewer than one row"), "{e}");
    let e = serde_yaml_ng::from_str::<FinetuneSpec>("data_format: answer").unwrap_err();
    assert!(e.to_string().contains("answers"), "{e}");
}

// ---------------------------------------------------------------------------------------
// The BOS default of evaluation

/// A tiny random model folder (stories260K's tokenizer.json) with `tokenizer_config`
/// (when given) as its tokenizer_config.json.
fn tiny_model(dir: &Path, tokenizer_config: Option<serde_json::Value>) -> TextTokenizer {
    let layer = TinyLayer {
        heads: 2,
        kv_heads: 1,
        mlp: 32,
    };
    write_tiny_model(dir, &[layer, layer], 7);
    if let Some(cfg) = tokenizer_config {
        std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    }
    load_folder(dir).tokenizer
}

fn load_folder(dir: &Path) -> model::LoadedModel {
    model::load(
        &ModelSource::Folder(dir.to_path_buf()),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap()
}

fn eval_spec(bos: Option<bool>) -> EvalSpec {
    let mut spec = EvalSpec::new("b", [rora::data::Task::ArcEasy]);
    spec.data_dir = shared_dir().join("data/commonsense");
    spec.limit = Some(3);
    spec.protocol = vec![Protocol::Content, Protocol::Choice];
    spec.bos = bos;
    spec
}

/// Every question's scores under `spec`, and the BOS value the report records.
fn scores(m: &model::LoadedModel, spec: &EvalSpec) -> (Vec<Vec<f64>>, bool) {
    let run = run_eval(spec, &m.model, &m.tokenizer, 0).unwrap();
    let s = run
        .records
        .iter()
        .map(|r| r.scores.clone().unwrap())
        .collect();
    (s, run.report.bos)
}

#[test]
fn folder_tokenizer_decides_the_bos_default() {
    let tmp = tempfile::tempdir().unwrap();
    // stories260K: no `add_bos_token`, its post-processor puts <s> first.
    assert!(load_stories().tokenizer.add_bos());
    let off = tmp.path().join("off");
    assert!(!tiny_model(
        &off,
        Some(serde_json::json!({"add_bos_token": false, "bos_token": "<s>"}))
    )
    .add_bos());
    let on = tmp.path().join("on");
    assert!(tiny_model(&on, Some(serde_json::json!({"add_bos_token": true}))).add_bos());

    // No key: the post-processor decides; a template without <s> adds none, no
    // post-processor at all falls back to BOS first.
    let mut tj: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(stories_dir().join("tokenizer.json")).unwrap(),
    )
    .unwrap();
    let plain = tmp.path().join("plain");
    tiny_model(&plain, None);
    tj["post_processor"]["single"] = serde_json::json!([{"Sequence": {"id": "A", "type_id": 0}}]);
    std::fs::write(plain.join("tokenizer.json"), tj.to_string()).unwrap();
    assert!(!load_folder(&plain).tokenizer.add_bos());
    tj["post_processor"] = serde_json::Value::Null;
    std::fs::write(plain.join("tokenizer.json"), tj.to_string()).unwrap();
    assert!(load_folder(&plain).tokenizer.add_bos());

    let bad = tmp.path().join("bad");
    tiny_model(&bad, None);
    std::fs::write(
        bad.join("tokenizer_config.json"),
        r#"{"add_bos_token": "no"}"#,
    )
    .unwrap();
    let e = model::load(
        &ModelSource::Folder(bad.clone()),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .err()
    .unwrap();
    let e = format!("{e:#}");
    assert!(
        e.contains("tokenizer_config.json") && e.contains("add_bos_token"),
        "{e}"
    );

    // Evaluation without `bos` does what the tokenizer does: the same scores as the
    // explicit setting, different ones from the other, and the report says which.
    for (dir, default) in [(&off, false), (&on, true)] {
        let m = load_folder(dir);
        let (by_default, recorded) = scores(&m, &eval_spec(None));
        assert_eq!(recorded, default);
        let (same, r) = scores(&m, &eval_spec(Some(default)));
        assert_eq!(r, default);
        assert_eq!(by_default, same, "{}", dir.display());
        let (other, r) = scores(&m, &eval_spec(Some(!default)));
        assert_eq!(r, !default);
        assert_ne!(by_default, other, "{}", dir.display());
    }

    // Perplexity resolves its `bos` the same way.
    let m = load_folder(&off);
    let text = tmp.path().join("t.txt");
    std::fs::write(
        &text,
        "Once upon a time, there was a little girl named Lily.",
    )
    .unwrap();
    let ppl = rora::eval::PplSpec::new(text.clone());
    let report = ppl.score(&m.model, &m.tokenizer, "ppl.text").unwrap();
    assert!(!report.bos);
    let explicit = rora::eval::PplSpec {
        bos: Some(true),
        ..rora::eval::PplSpec::new(text)
    };
    assert!(explicit.score(&m.model, &m.tokenizer, "t").unwrap().bos);
}

#[test]
fn recover_eval_takes_bos() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    tiny_model(&dir, Some(serde_json::json!({"add_bos_token": false})));
    let data_dir = shared_dir().join("data/commonsense");
    let run = |bos: Option<&str>| -> std::process::Output {
        let mut args = vec![
            "eval",
            "--model",
            dir.to_str().unwrap(),
            "--tasks",
            "ARC-Easy",
            "--limit",
            "2",
            "--data-dir",
            data_dir.to_str().unwrap(),
            "--json",
        ];
        if let Some(b) = bos {
            args.extend(["--bos", b]);
        }
        recover(&args)
    };
    let report_bos = |out: &std::process::Output| -> (bool, serde_json::Value) {
        assert!(out.status.success(), "{}", stderr(out));
        let v: serde_json::Value =
            serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
        let tokens = v["protocols"][0]["tasks"][0]["tokens"].clone();
        (v["bos"].as_bool().unwrap(), tokens)
    };
    let (default, tokens_default) = report_bos(&run(None));
    let (off, tokens_off) = report_bos(&run(Some("false")));
    let (on, tokens_on) = report_bos(&run(Some("true")));
    assert_eq!((default, off, on), (false, false, true));
    assert_eq!(tokens_default, tokens_off);
    assert_ne!(tokens_on, tokens_off);
    let out = run(Some("maybe"));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--bos"), "{}", stderr(&out));
}
