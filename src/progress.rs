//! Progress bars on stderr, one style for every long loop. indicatif draws nothing when
//! stderr is not a terminal, so logs and tests stay clean.

use indicatif::{ProgressBar, ProgressStyle};

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
    pb
}
