//! The protocols on the real tiny model stories260K: batched + cached scoring equals
//! scoring each full sequence alone; cached, left-padded generation equals recomputing
//! the whole sequence each step; the eval stage's three reports.

use rora::data::prompt::evaluation_prompt;
use rora::data::{load_task, Question, Task};
use rora::eval::content::content_pairs;
use rora::eval::generate::{beam_search_batch, generate_batch, greedy_batch, greedy_no_cache};
use rora::eval::protocols::choice_candidates;
use rora::eval::scoring::{argmax, score_candidates, score_full_sequence, Candidate};
use rora::eval::{EvalReport, EvalSpec, Protocol};
use rora::pipeline::{runner::write_outputs, stages, Stage, StageContext};
use std::path::PathBuf;

fn data_dir() -> PathBuf {
    crate::common::shared_dir().join("data/commonsense")
}

fn questions(task: Task, n: usize) -> Vec<Question> {
    load_task(task, &data_dir())
        .unwrap()
        .into_iter()
        .take(n)
        .collect()
}

/// Batched scores equal full-sequence scores to 1e-4 and pick the same candidate.
fn check_against_full(model: &rora::model::Llama, cands: &[Vec<Candidate>], batch: usize) {
    let mut checked = 0;
    for chunk in cands.chunks(batch) {
        let scores = score_candidates(model, chunk).unwrap();
        assert!(scores.tokens > 0);
        for (q, lp) in chunk.iter().zip(&scores.logprobs) {
            let full: Vec<f64> = q
                .iter()
                .map(|c| score_full_sequence(model, c).unwrap())
                .collect();
            for (a, b) in lp.iter().zip(&full) {
                assert!((a - b).abs() < 1e-4, "batched {a} vs full {b}");
            }
            assert_eq!(argmax(lp), argmax(&full));
            checked += 1;
        }
    }
    assert_eq!(checked, cands.len());
}

#[test]
fn choice_batched_equals_full_sequences_on_20_questions() {
    let loaded = crate::common::load_stories();
    let (model, tok) = (&loaded.model, &loaded.tokenizer);
    // 20 questions with 2 to 5 labels: ARC-Easy (with a 5-choice one), PIQA, BoolQ.
    let mut qs = questions(Task::ArcEasy, 8);
    let five = load_task(Task::ArcEasy, &data_dir())
        .unwrap()
        .into_iter()
        .find(|q| q.parsed.labels.len() == 5)
        .unwrap();
    qs.push(five);
    qs.extend(questions(Task::Piqa, 6));
    qs.extend(questions(Task::BoolQ, 5));
    assert_eq!(qs.len(), 20);
    let cands: Vec<Vec<Candidate>> = qs
        .iter()
        .map(|q| choice_candidates(tok, q, true).unwrap())
        .collect();
    for (q, c) in qs.iter().zip(&cands) {
        assert_eq!(c.len(), q.parsed.labels.len());
        // The continuation is what follows the prompt's tokens.
        let prompt = tok
            .encode(&evaluation_prompt(&q.instruction), true)
            .unwrap();
        assert_eq!(c[0].n_ctx, prompt.len());
    }
    check_against_full(model, &cands, 7);
}

#[test]
fn content_batched_equals_full_sequences() {
    let loaded = crate::common::load_stories();
    let (model, tok) = (&loaded.model, &loaded.tokenizer);
    // WinoGrande: contexts differ per option, the continuation is shared; HellaSwag: long
    // endings; SIQA: three options.
    let mut qs = questions(Task::WinoGrande, 4);
    qs.extend(questions(Task::HellaSwag, 3));
    qs.extend(questions(Task::SocialIqa, 3));
    let cands: Vec<Vec<Candidate>> = qs
        .iter()
        .map(|q| {
            content_pairs(q)
                .unwrap()
                .iter()
                .map(|(ctx, cont)| Candidate::split(tok, ctx, cont, true).unwrap())
                .collect()
        })
        .collect();
    check_against_full(model, &cands, 4);
}

#[test]
fn cached_left_padded_generation_equals_recomputation() {
    let loaded = crate::common::load_stories();
    let (model, tok) = (&loaded.model, &loaded.tokenizer);
    let texts = [
        "Once upon a time",
        "Tom had a red ball. He",
        "The little girl looked at the sky and said",
        "Lily",
    ];
    let prompts: Vec<Vec<u32>> = texts.iter().map(|t| tok.encode(t, true).unwrap()).collect();
    let eos = tok.eos_ids();
    let max_new = 24;
    let batched = greedy_batch(model, &prompts, max_new, eos).unwrap();
    for (p, got) in prompts.iter().zip(&batched) {
        let reference = greedy_no_cache(model, p, max_new, eos).unwrap();
        assert!(!reference.is_empty());
        assert_eq!(*got, reference, "prompt {:?}", tok.decode(p).unwrap());
        // Alone (no padding) too.
        let alone = greedy_batch(model, std::slice::from_ref(p), max_new, eos).unwrap();
        assert_eq!(alone[0], reference);
    }
    // Stopping at EOS: a token we declare EOS ends the generation before it.
    let stop = batched[0][3];
    let cut = greedy_batch(model, &prompts[..1], max_new, &[stop]).unwrap();
    let first = batched[0].iter().position(|t| *t == stop).unwrap();
    assert_eq!(cut[0], batched[0][..first]);
}

#[test]
fn beam_search_batched_equals_one_prompt_at_a_time() {
    let loaded = crate::common::load_stories();
    let (model, tok) = (&loaded.model, &loaded.tokenizer);
    let prompts: Vec<Vec<u32>> = ["Once upon a time", "The dog ran to the park and"]
        .iter()
        .map(|t| tok.encode(t, true).unwrap())
        .collect();
    let eos = tok.eos_ids();
    let batched = beam_search_batch(model, &prompts, 12, eos, 3).unwrap();
    for (p, got) in prompts.iter().zip(&batched) {
        let alone = beam_search_batch(model, std::slice::from_ref(p), 12, eos, 3).unwrap();
        assert_eq!(*got, alone[0]);
        assert!(!got.is_empty());
    }
    // One beam is greedy.
    assert_eq!(
        generate_batch(model, &prompts, 12, eos, 1).unwrap(),
        greedy_batch(model, &prompts, 12, eos).unwrap()
    );
}

/// `skip`: a confirmation set after the first N questions, named in the report; a skip
/// past the end of a task is an error naming the task and the file.
#[test]
fn eval_skip_evaluates_the_questions_after_the_first_n() {
    let m = crate::common::load_stories();
    let run = |spec: &EvalSpec| rora::eval::run_eval(spec, &m.model, &m.tokenizer, 7);
    let mut spec = EvalSpec::new("confirm", [Task::Piqa]);
    spec.data_dir = data_dir();
    spec.skip = 5;
    spec.limit = Some(3);
    let out = run(&spec).unwrap();
    let indices: Vec<usize> = out.records.iter().map(|r| r.index).collect();
    assert_eq!(indices, [5, 6, 7]);
    assert_eq!(out.report.skip, 5);
    assert!(out
        .report
        .to_markdown()
        .contains("the first 3 per task, after the first 5 of each task (`skip`)"));
    // The same questions, evaluated without `skip`, score the same: to 1e-5 relative,
    // as they share their batches with other questions there (another padding, so f32
    // sums in another order: ~1e-7 relative measured).
    spec.skip = 0;
    spec.limit = Some(8);
    let all = run(&spec).unwrap();
    for (a, b) in out.records.iter().zip(&all.records[5..8]) {
        assert_eq!((a.index, &a.predicted), (b.index, &b.predicted));
        for (x, y) in a.scores.iter().flatten().zip(b.scores.iter().flatten()) {
            assert!((x - y).abs() <= 1e-5 * x.abs(), "{x} vs {y}");
        }
    }
    spec.skip = load_task(Task::Piqa, &data_dir()).unwrap().len();
    let err = format!("{:#}", run(&spec).unwrap_err());
    assert!(
        err.contains("eval.skip") && err.contains("piqa") && err.contains("test.json"),
        "{err}"
    );
}

#[test]
fn eval_stage_writes_the_three_reports() {
    let mut ctx = StageContext::new(candle_core::Device::Cpu, candle_core::DType::F32, 7);
    ctx.model = Some(crate::common::load_stories());
    let dir = tempfile::tempdir().unwrap();
    let mut spec = EvalSpec::new(
        "before",
        [Task::BoolQ, Task::Piqa, Task::WinoGrande, Task::HellaSwag],
    );
    spec.data_dir = data_dir();
    spec.limit = Some(4);
    spec.batch_size = 3;
    spec.max_new_tokens = 6;
    spec.protocol = vec![Protocol::Generate, Protocol::Choice, Protocol::Content];
    let out = stages::eval(&spec, &mut ctx).unwrap();
    write_outputs(dir.path(), &Stage::Eval(spec), &out).unwrap();
    let report = out.report;
    assert_eq!(report.protocols.len(), 3);
    for p in &report.protocols {
        assert_eq!(p.tasks.len(), 4);
        for t in &p.tasks {
            assert_eq!(t.n, 4);
            assert!(t.ci95[0] <= t.accuracy && t.accuracy <= t.ci95[1]);
            assert!(t.tokens > 0);
            assert_eq!(t.acc_norm.is_some(), p.protocol == Protocol::Content);
            if p.protocol != Protocol::Generate {
                assert_eq!(t.unparsed, 0);
            }
        }
    }
    let json: EvalReport = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("eval-before.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(json.label, "before");
    for (a, b) in json.protocols.iter().zip(&report.protocols) {
        assert_eq!(a.protocol, b.protocol);
        assert!((a.average - b.average).abs() < 1e-12);
        for (x, y) in a.tasks.iter().zip(&b.tasks) {
            assert_eq!(
                (x.task, x.n, x.correct, x.unparsed),
                (y.task, y.n, y.correct, y.unparsed)
            );
        }
    }
    let md = std::fs::read_to_string(dir.path().join("eval-before.md")).unwrap();
    assert!(md.contains(
        "| before | BoolQ | PIQA | SIQA | HellaSwag | WinoGrande | ARC-e | ARC-c | OBQA | Average |"
    ));
    assert!(md.contains("| content (acc_norm) |"));
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(dir.path().join("eval-before.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    assert_eq!(lines.len(), 3 * 4 * 4);
    assert!(lines.iter().any(|l| l["generation"].is_string()));
    assert!(lines.iter().any(|l| l["scores_norm"].is_array()));
    // Seeded sampling: a subset in file order, the same for the same seed.
    let select = rora::eval::run::select_questions;
    let a = select(100, 0, Some(10), true, 7, Task::Piqa);
    assert_eq!(a, select(100, 0, Some(10), true, 7, Task::Piqa));
    assert_ne!(a, (0..10).collect::<Vec<_>>());
    assert!(a.windows(2).all(|w| w[0] < w[1]));
    // `skip`: a confirmation set disjoint from the first N, in file order.
    assert_eq!(
        select(100, 90, Some(20), false, 7, Task::Piqa),
        (90..100).collect::<Vec<_>>()
    );
    assert_eq!(
        select(100, 10, Some(5), false, 7, Task::Piqa),
        (10..15).collect::<Vec<_>>()
    );
    let b = select(100, 50, Some(10), true, 7, Task::Piqa);
    assert!(b.iter().all(|&i| (50..100).contains(&i)) && b.len() == 10);
    assert!(select(100, 100, None, false, 7, Task::Piqa).is_empty());
}
