//! Progress bars for the command line (indicatif): drawn on standard error when it is a terminal,
//! hidden otherwise, where a caller logs a line now and then instead.

use std::io::IsTerminal;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// A bar of rows rendered, `label [#####>    ]  40% (40/100 rows)`, `len` rows long to begin
/// with; hidden where standard error is not a terminal, or where `quiet`.
pub fn rows_bar(label: &str, len: u64, quiet: bool) -> ProgressBar {
    let shown = std::io::stderr().is_terminal() && !quiet;
    let target = if shown { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() };
    let bar = ProgressBar::with_draw_target(Some(len), target);
    count(&bar, "rows");
    bar.set_prefix(label.to_owned());
    bar
}

/// Makes `bar` count `unit` (`rows`, `tiles`).
pub fn count(bar: &ProgressBar, unit: &str) {
    let template = format!("{{prefix}} [{{bar:25}}] {{percent:>3}}% ({{pos}}/{{len}} {unit})");
    // The template is fixed and valid; were it refused, the bar keeps indicatif's default look.
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style.progress_chars("#> "));
    }
}
