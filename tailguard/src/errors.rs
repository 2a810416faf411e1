//! How an error is said: in one line, the error and its sources, each by
//! its first line and each only once (many messages here already embed
//! their source's), for log lines and `/status` fields; or in full, every
//! line of each (a verifier's log), for the debug log. `main` prints the
//! whole chain itself.

use std::error::Error;

/// `error` and its sources in one line.
pub fn one_line(error: &dyn Error) -> String {
    chain(error, |text| {
        text.lines().next().unwrap_or_default().trim().to_string()
    })
}

/// `error` and its sources, every line of each.
pub fn in_full(error: &dyn Error) -> String {
    chain(error, str::to_string)
}

/// `error` and its sources, each as `say` puts it, joined by `: `; a
/// source whose text is in the line already is left out.
fn chain(error: &dyn Error, say: impl Fn(&str) -> String) -> String {
    let mut line = say(&error.to_string());
    let mut source = error.source();
    while let Some(e) = source {
        let text = say(&e.to_string());
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

    #[test]
    fn in_full_keeps_every_line() {
        let inner = std::io::Error::other("verifier says\n0: r1 = r10\n1: exit");
        assert_eq!(
            in_full(&Outer(inner)),
            "starting up: verifier says\n0: r1 = r10\n1: exit"
        );
    }
}
