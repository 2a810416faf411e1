//! The package sources as apt itself reads them. apt's own parser (through
//! `apt-get indextargets`) does the reading, so both formats (one-line
//! `.list` files and deb822 `.sources`), comments, `[option=value]` lists
//! and `Enabled: no` mean here exactly what they mean to apt, and a broken
//! file is refused with apt's own message (file and line).
//!
//! The project names no mirror: where packages come from is what the
//! machine's (or, in the Dockerfile, the base image's) sources say.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

/// The files apt reads its sources from.
#[derive(Clone, Debug)]
pub struct SourceFiles {
    /// The one-line list (`/etc/apt/sources.list`).
    pub list: PathBuf,
    /// The directory of `*.list` and `*.sources` files.
    pub parts: PathBuf,
}

/// One `deb` source: a suite at a URI, and where apt read it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    /// The archive's URI as apt uses it (with a closing `/`).
    pub uri: String,
    pub suite: String,
    /// `FILE:ENTRY`: the line of a `.list`, the stanza of a `.sources`.
    pub entry: String,
}

impl SourceFiles {
    /// This machine's.
    pub fn system() -> Self {
        Self {
            list: PathBuf::from("/etc/apt/sources.list"),
            parts: PathBuf::from("/etc/apt/sources.list.d"),
        }
    }

    /// The files read, for messages.
    pub fn describe(&self) -> String {
        format!(
            "{} and {}/ (*.list, *.sources)",
            self.list.display(),
            self.parts.display()
        )
    }

    /// Every `deb` source, in apt's order, each suite at each URI once.
    pub fn sources(&self) -> Result<Vec<Source>> {
        let mut apt = Command::new("apt-get");
        apt.arg("indextargets")
            // From the sources alone: no downloaded Release file needed.
            .arg("--no-release-info")
            .arg(option("Dir::Etc::sourcelist", &self.list))
            .arg(option("Dir::Etc::sourceparts", &self.parts))
            .args([
                "--format",
                "$(TARGET_OF)\t$(REPO_URI)\t$(RELEASE)\t$(SOURCESENTRY)",
            ]);
        let out = apt
            .output()
            .context("running apt-get indextargets (is apt installed?)")?;
        if !out.status.success() {
            bail!(
                "apt cannot read its sources ({}): {}",
                self.describe(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(parse_targets(&String::from_utf8_lossy(&out.stdout)))
    }

    /// The first `deb` source of `suite`, if any.
    pub fn find(&self, suite: &str) -> Result<Option<Source>> {
        Ok(self.sources()?.into_iter().find(|s| s.suite == suite))
    }

    /// The archive that carries `suite` (e.g. the release's own, to take
    /// its mirror for another suite or for debootstrap).
    pub fn archive(&self, suite: &str) -> Result<Source> {
        self.find(suite)?.with_context(|| {
            format!(
                "no `deb` source for the suite {suite} in {}: add the release's own \
                 archive there (the project names no mirror of its own)",
                self.describe()
            )
        })
    }
}

/// `-o NAME=PATH`.
fn option(name: &str, path: &Path) -> String {
    format!("-o{name}={}", path.display())
}

/// `apt-get indextargets` lines (one per index file: several per source)
/// to `deb` sources, each once.
fn parse_targets(output: &str) -> Vec<Source> {
    let mut sources: Vec<Source> = Vec::new();
    for line in output.lines() {
        let mut fields = line.split('\t');
        let (Some("deb"), Some(uri), Some(suite), Some(entry)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if !sources.iter().any(|s| s.uri == uri && s.suite == suite) {
            sources.push(Source {
                uri: uri.to_string(),
                suite: suite.to_string(),
                entry: entry.to_string(),
            });
        }
    }
    sources
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// Source files as Debian writes them, under `xtask/fixtures/apt/CASE`
    /// (`sources.list`, `sources.list.d/`), with made-up hosts.
    pub fn fixture(case: &str) -> SourceFiles {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/apt")
            .join(case);
        SourceFiles {
            list: dir.join("sources.list"),
            parts: dir.join("sources.list.d"),
        }
    }

    fn suites(files: &SourceFiles) -> Vec<(String, String)> {
        files
            .sources()
            .unwrap()
            .into_iter()
            .map(|s| (s.suite, s.uri))
            .collect()
    }

    fn pair(suite: &str, uri: &str) -> (String, String) {
        (suite.to_string(), uri.to_string())
    }

    #[test]
    fn deb822_as_the_debian_image_writes_it() {
        let files = fixture("deb822");
        assert_eq!(
            suites(&files),
            [
                pair("bookworm", "http://mirror.example/debian/"),
                pair("bookworm-updates", "http://mirror.example/debian/"),
                pair(
                    "bookworm-security",
                    "http://mirror.example/debian-security/"
                ),
            ]
        );
        let archive = files.archive("bookworm").unwrap();
        assert_eq!(archive.uri, "http://mirror.example/debian/");
        assert!(
            archive.entry.ends_with("sources.list.d/debian.sources:1"),
            "{}",
            archive.entry
        );
    }

    #[test]
    fn one_line_list_as_the_installer_writes_it() {
        // A commented-out cdrom line, deb-src lines, an options list and a
        // comment after an entry: only the `deb` entries count.
        assert_eq!(
            suites(&fixture("one-line")),
            [
                pair("bookworm", "http://mirror.example/debian/"),
                pair(
                    "bookworm-security",
                    "http://security.mirror.example/debian-security/"
                ),
                pair("bookworm-updates", "http://mirror.example/debian/"),
            ]
        );
    }

    #[test]
    fn disabled_stanzas_other_file_names_and_deb_src_are_not_sources() {
        // `Enabled: no`, a `.sources.disabled` file apt ignores, and a
        // `deb-src` line (source packages only).
        let files = fixture("disabled");
        assert_eq!(
            suites(&files),
            [pair("trixie", "http://mirror.example/debian/")]
        );
        assert_eq!(files.find("bookworm").unwrap(), None);
    }

    #[test]
    fn no_sources_is_an_error_naming_the_files_read() {
        let files = fixture("none");
        assert_eq!(files.sources().unwrap(), []);
        let error = format!("{:#}", files.archive("bookworm").unwrap_err());
        assert!(
            error.contains("no `deb` source for the suite bookworm"),
            "{error}"
        );
        assert!(error.contains(&files.list.display().to_string()), "{error}");
        assert!(
            error.contains(&files.parts.display().to_string()),
            "{error}"
        );
    }

    #[test]
    fn a_malformed_file_is_refused_with_apts_message() {
        let error = format!("{:#}", fixture("malformed").sources().unwrap_err());
        assert!(error.contains("apt cannot read its sources"), "{error}");
        assert!(error.contains("broken.sources"), "{error}");
    }
}
