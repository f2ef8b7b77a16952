//! Progress bars on stderr, one style for every long loop. indicatif draws nothing when
//! stderr is not a terminal, so logs and tests stay clean. Every bar joins one
//! `MultiProgress`, so that a loop's bar stacks under an enclosing one (a sweep's cells)
//! instead of drawing over it.

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::sync::LazyLock;

static BARS: LazyLock<MultiProgress> = LazyLock::new(MultiProgress::new);

pub fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix:>12.bold} [{bar:30}] {pos}/{len} {msg} ({elapsed_precise}, ETA {eta})",
        )
        .expect("valid progress template")
        .progress_chars("=> "),
    );
    pb.set_prefix(what.to_string());
    BARS.add(pb)
}

/// Prints a line on stderr above the bars (a plain line when there are none).
pub fn line(text: &str) {
    BARS.suspend(|| eprintln!("{text}"));
}
