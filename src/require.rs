//! `RORA_REQUIRE`: inputs a test may not skip for. A test that needs a bf16 kernel (`bf16`:
//! AMX or AVX512-BF16), AMX itself (`amx`) or the SmolLM2 GGUF (`smollm2`) and finds it
//! missing skips with a line on stderr, so that the suite runs on any machine — unless
//! `RORA_REQUIRE` (a comma-separated list such as `smollm2,bf16,amx`) names
//! that input: then it fails. CI sets it from what the machine has (`/proc/cpuinfo`, the
//! fetched GGUF), so a test there can never pass by skipping.

/// Whether `RORA_REQUIRE` names `input`.
pub fn required(input: &str) -> bool {
    std::env::var("RORA_REQUIRE").is_ok_and(|v| v.split(',').any(|name| name.trim() == input))
}

/// Call where a test is about to skip because `input` is missing (`why` says what is
/// missing and how to get it): prints that it skips, or panics when `input` is required.
pub fn skip_or_fail(input: &str, why: &str) {
    if required(input) {
        panic!("RORA_REQUIRE names `{input}` but {why}");
    }
    eprintln!("skipped: {why}");
}
