//! How an error is said in one line: the error and its sources, each by
//! its first line and each only once (many messages here already embed
//! their source's). For log lines and `/status` fields; `main` prints the
//! whole chain itself.

use std::error::Error;

/// `error` and its sources in one line.
pub fn one_line(error: &dyn Error) -> String {
    let first_line = |e: &dyn Error| {
        let text = e.to_string();
        text.lines().next().unwrap_or_default().trim().to_string()
    };
    let mut line = first_line(error);
    let mut source = error.source();
    while let Some(e) = source {
        let text = first_line(e);
        if !line.contains(&text) {
            line = format!("{line}: {text}");
        }
        source = e.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("starting up")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn each_source_is_said_once_in_one_line() {
        let inner = std::io::Error::other("disk on fire\nand more");
        assert_eq!(one_line(&Outer(inner)), "starting up: disk on fire");
        let embedded = std::io::Error::other("starting up");
        assert_eq!(one_line(&Outer(embedded)), "starting up");
    }
}
