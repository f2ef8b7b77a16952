//! Commonsense data: every test file parses with the counts of SOURCES.md, gold labels
//! are allowed by their format, options parse; answer extraction; bad input.

use rora::data::options::answer_format;
use rora::data::{load_task, load_task_file, Task};
use rora::eval::answer::extract_answer;
use rora::eval::content::content_pairs;
use rora::eval::EvalSpec;
use std::path::PathBuf;

fn data_dir() -> PathBuf {
    crate::common::shared_dir().join("data/commonsense")
}

#[test]
fn every_test_file_parses_with_the_counts_of_sources_md() {
    let expected = [
        (Task::ArcChallenge, 1172),
        (Task::ArcEasy, 2376),
        (Task::BoolQ, 3270),
        (Task::OpenBookQa, 500),
        (Task::Piqa, 1838),
        (Task::SocialIqa, 1954),
        (Task::WinoGrande, 1267),
        (Task::HellaSwag, 10042),
    ];
    for (task, n) in expected {
        let qs = load_task(task, &data_dir()).unwrap();
        assert_eq!(qs.len(), n, "{}", task.name());
        for q in &qs {
            // The gold label is one the question's own `Answer format:` allows.
            let allowed = answer_format(&q.instruction).unwrap();
            assert!(allowed.contains(&q.gold), "{} {}", task.name(), q.index);
            assert_eq!(allowed, q.parsed.labels);
            // As many options as the format announces, none empty.
            if task == Task::BoolQ {
                assert_eq!(q.parsed.labels, ["true", "false"]);
            } else {
                assert_eq!(
                    q.parsed.options.len(),
                    allowed.len(),
                    "{} {}",
                    task.name(),
                    q.index
                );
                assert!(q.parsed.options.iter().all(|o| !o.trim().is_empty()));
            }
            assert!(!q.parsed.question.is_empty());
            // The content protocol has a context and a continuation per label.
            let pairs = content_pairs(q).unwrap();
            assert_eq!(pairs.len(), allowed.len());
            assert!(pairs.iter().all(|(c, k)| !c.is_empty() && k.len() > 1));
        }
    }
}

#[test]
fn option_counts_match_sources_md_answer_balance() {
    // ARC-Easy: one question with a gold answer5, some 3- and 5-choice questions.
    let qs = load_task(Task::ArcEasy, &data_dir()).unwrap();
    assert_eq!(qs.iter().filter(|q| q.gold == "answer5").count(), 1);
    assert!(qs.iter().any(|q| q.parsed.options.len() == 5));
    assert!(qs.iter().any(|q| q.parsed.options.len() == 3));
    let q = &qs[0];
    assert_eq!(
        q.parsed.question,
        "Which statement best explains why photosynthesis is the foundation of most food webs?"
    );
    assert_eq!(
        q.parsed.options[3],
        "The producers in all ecosystems are plants."
    );
    let wg = load_task(Task::WinoGrande, &data_dir()).unwrap();
    let pairs = content_pairs(&wg[0]).unwrap();
    assert_eq!(
        pairs[0],
        (
            "Sarah was a much better surgeon than Maria so Sarah".to_string(),
            " always got the easier cases.".to_string()
        )
    );
    assert_eq!(
        pairs[1].0,
        "Sarah was a much better surgeon than Maria so Maria"
    );
    let bq = load_task(Task::BoolQ, &data_dir()).unwrap();
    let pairs = content_pairs(&bq[0]).unwrap();
    assert_eq!(
        pairs[0],
        (
            "Question: does ethanol take more energy make that produces?\nAnswer:".to_string(),
            " yes".to_string()
        )
    );
    assert_eq!(pairs[1].1, " no");
}

#[test]
fn answer_extraction_table() {
    use Task::*;
    // (task, generation, expected answer)
    let table: &[(Task, &str, Option<&str>)] = &[
        (BoolQ, "the correct answer is true", Some("true")),
        (BoolQ, "the correct answer is false", Some("false")),
        (BoolQ, "false, not true", Some("false")),
        (BoolQ, "true or false? false", Some("true")),
        (BoolQ, "The answer is True", None),
        (BoolQ, "FALSE", None),
        (BoolQ, "", None),
        (BoolQ, "untrue", Some("true")),
        (BoolQ, "yes", None),
        (Piqa, "the correct answer is solution2", Some("solution2")),
        (
            Piqa,
            "solution1 is better than solution2",
            Some("solution1"),
        ),
        (Piqa, "Solution1", None),
        (Piqa, "solution3", None),
        (Piqa, "solution12 then solution2", Some("solution2")),
        (SocialIqa, "the correct answer is answer3", Some("answer3")),
        (SocialIqa, "answer5", Some("answer5")),
        (SocialIqa, "Answer2", None),
        (ArcEasy, "the correct answer is answer12", None),
        (ArcEasy, "answer12 or answer4", Some("answer4")),
        (ArcEasy, "answer10", None),
        (ArcEasy, "answer1.", Some("answer1")),
        (ArcEasy, "answer1answer2", Some("answer1")),
        (ArcEasy, "theanswer2", Some("answer2")),
        (ArcEasy, "answer6", None),
        (ArcEasy, "answer 2", None),
        (ArcChallenge, "answer5 answer1", Some("answer5")),
        (
            ArcChallenge,
            "the correct answer is answer4\n",
            Some("answer4"),
        ),
        (OpenBookQa, "answer3, I think answer1", Some("answer3")),
        (OpenBookQa, "the correct answer is", None),
        (HellaSwag, "the correct answer is ending4", Some("ending4")),
        (HellaSwag, "ending5 ending2", Some("ending2")),
        (HellaSwag, "Ending1", None),
        (HellaSwag, "endings1", None),
        (WinoGrande, "the correct answer is option1", Some("option1")),
        (WinoGrande, "option2option1", Some("option2")),
        (WinoGrande, "option3", None),
        (WinoGrande, "option21", None),
        (
            ArcEasy,
            "nothing\n### Response:\nanswer2",
            None, // text after a second `### Response:` does not count
        ),
        (ArcEasy, "answer2 ### Response: answer3", Some("answer2")),
    ];
    assert!(table.len() >= 30);
    for (task, text, want) in table {
        assert_eq!(
            extract_answer(*task, text).as_deref(),
            *want,
            "{} on {text:?}",
            task.name()
        );
    }
}

fn write(dir: &std::path::Path, name: &str, json: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, json).unwrap();
    p
}

#[test]
fn bad_input_is_a_clear_error() {
    // An unknown task lists the tasks.
    let e = Task::parse("hellaswagg").unwrap_err().to_string();
    assert!(
        e.contains("hellaswagg") && e.contains("ARC-Challenge") && e.contains("boolq"),
        "{e}"
    );
    let e = serde_yaml_ng::from_str::<EvalSpec>("label: x\ntasks: [piqa, nope]\n")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`nope`") && e.contains("openbookqa") && e.contains("ppl"),
        "{e}"
    );

    let dir = tempfile::tempdir().unwrap();
    let good = r#"{"instruction": "Please answer the following question with true or false, question: is it?\n\nAnswer format: true/false", "input": "", "output": "the correct answer is true", "answer": "true"}"#;
    // A missing field names the file and the item.
    let p = write(
        dir.path(),
        "missing.json",
        &format!(r#"[{good}, {{"instruction": "x", "input": "", "output": "y"}}]"#),
    );
    let e = format!("{:#}", load_task_file(Task::BoolQ, &p).unwrap_err());
    assert!(
        e.contains("missing.json") && e.contains("item 1") && e.contains("answer"),
        "{e}"
    );
    let p = write(
        dir.path(),
        "noinstr.json",
        &format!(r#"[{good}, {good}, {{"input": "", "output": "y", "answer": "true"}}]"#),
    );
    let e = format!("{:#}", load_task_file(Task::BoolQ, &p).unwrap_err());
    assert!(e.contains("noinstr.json") && e.contains("item 2"), "{e}");
    // A gold label outside the question's format.
    let p = write(
        dir.path(),
        "label.json",
        &format!(
            "[{good}, {}]",
            good.replace(r#""answer": "true""#, r#""answer": "maybe""#)
        ),
    );
    let e = format!("{:#}", load_task_file(Task::BoolQ, &p).unwrap_err());
    assert!(
        e.contains("label.json") && e.contains("item 1") && e.contains("`maybe`"),
        "{e}"
    );
    let arc = r#"[{"instruction": "Please choose the correct answer to the question: Q?\n\nAnswer1: a Answer2: b Answer3: c\n\nAnswer format: answer1/answer2/answer3", "input": "", "output": "the correct answer is answer4", "answer": "answer4"}]"#;
    let p = write(dir.path(), "arc.json", arc);
    let e = format!("{:#}", load_task_file(Task::ArcEasy, &p).unwrap_err());
    assert!(
        e.contains("arc.json") && e.contains("item 0") && e.contains("answer4"),
        "{e}"
    );
    // A file of the wrong task: its format is not the task's.
    let e = format!("{:#}", load_task_file(Task::Piqa, &p).unwrap_err());
    assert!(e.contains("arc.json") && e.contains("item 0"), "{e}");
    // A missing data folder.
    let e = load_task(Task::Piqa, dir.path()).unwrap_err().to_string();
    assert!(e.contains("piqa") && e.contains("test.json"), "{e}");
}

#[test]
fn spec_defaults_and_unknown_keys() {
    let s: EvalSpec = serde_yaml_ng::from_str("label: before\ntasks: [piqa]\n").unwrap();
    assert_eq!(s, EvalSpec::new("before", [Task::Piqa]));
    assert_eq!(s.protocol, vec![rora::eval::Protocol::Content]);
    let s: EvalSpec =
        serde_yaml_ng::from_str("label: a\ntasks: [piqa]\nprotocol: generate\nlimit: 5\n").unwrap();
    assert_eq!(s.protocol, vec![rora::eval::Protocol::Generate]);
    let s: EvalSpec =
        serde_yaml_ng::from_str("label: a\ntasks: [piqa]\nprotocol: [choice, content]\n").unwrap();
    assert_eq!(s.protocol.len(), 2);
    assert!(serde_yaml_ng::from_str::<EvalSpec>("label: a\ntasks: [piqa]\nlimt: 5\n").is_err());
    assert!(
        serde_yaml_ng::from_str::<EvalSpec>("label: a\ntasks: [piqa]\nprotocol: guess\n").is_err()
    );
    let mut s = EvalSpec::new("a/b", [Task::Piqa]);
    assert!(s.validate().is_err());
    s.label = "after".into();
    s.limit = Some(0);
    assert!(s.validate().is_err());
}

#[test]
fn wilson_interval_matches_known_values() {
    let [lo, hi] = rora::eval::wilson_interval(49, 100);
    assert!(
        (lo - 0.3942).abs() < 1e-3 && (hi - 0.5865).abs() < 1e-3,
        "{lo} {hi}"
    );
    assert_eq!(rora::eval::wilson_interval(0, 0), [0.0, 1.0]);
    let [lo, hi] = rora::eval::wilson_interval(10, 10);
    assert!(hi > 0.9999 && (lo - 0.7225).abs() < 1e-3, "{lo} {hi}");
}
