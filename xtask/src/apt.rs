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

    /// What the fixtures write where a mirror's address goes: the tests
    /// put this machine's own mirror there at run time, so that no file of
    /// the project names one.
    const MIRROR: &str = "@MIRROR@";

    /// This machine's own mirror (the scheme and host of its first `deb`
    /// source with a host), read the way setup reads it.
    pub fn machine_mirror() -> String {
        static MACHINE_MIRROR: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        MACHINE_MIRROR
            .get_or_init(|| {
                let system = SourceFiles::system();
                let sources = system
                    .sources()
                    .expect("reading this machine's apt sources");
                let first = sources
                    .iter()
                    .find(|s| s.uri.contains("://"))
                    .unwrap_or_else(|| {
                        panic!(
                            "the apt tests write their fixtures with this machine's own mirror, \
                         and {} has no `deb` source",
                            system.describe()
                        )
                    });
                let host_starts = first.uri.find("://").map_or(0, |scheme| scheme + 3);
                let path_starts = first.uri[host_starts..]
                    .find('/')
                    .map_or(first.uri.len(), |slash| host_starts + slash);
                first.uri[..path_starts].to_string()
            })
            .clone()
    }

    /// Source files as Debian writes them, from `xtask/fixtures/apt/CASE`
    /// (`sources.list`, `sources.list.d/`), copied into a directory of the
    /// calling test's own with [`machine_mirror`] written in; removed when
    /// dropped.
    pub fn fixture(case: &str) -> Fixture {
        let from = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fixtures/apt")
            .join(case);
        let dir = std::env::temp_dir().join(format!(
            "tailguard-xtask-{case}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let files = SourceFiles {
            list: dir.join("sources.list"),
            parts: dir.join("sources.list.d"),
        };
        std::fs::create_dir_all(&files.parts).unwrap();
        // Only a fixture that has the placeholder needs the machine's mirror.
        let copy = |from: &Path, to: &Path| {
            let mut text = std::fs::read_to_string(from).unwrap();
            if text.contains(MIRROR) {
                text = text.replace(MIRROR, &machine_mirror());
            }
            std::fs::write(to, text).unwrap();
        };
        let list = from.join("sources.list");
        if list.exists() {
            copy(&list, &files.list);
        }
        for entry in std::fs::read_dir(from.join("sources.list.d"))
            .into_iter()
            .flatten()
            .flatten()
        {
            copy(&entry.path(), &files.parts.join(entry.file_name()));
        }
        Fixture { files }
    }

    /// A fixture's copy, for one test.
    pub struct Fixture {
        files: SourceFiles,
    }

    impl std::ops::Deref for Fixture {
        type Target = SourceFiles;
        fn deref(&self) -> &SourceFiles {
            &self.files
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(self.files.parts.parent().unwrap());
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

    /// `(suite, the machine's mirror + path)`.
    fn pair(suite: &str, path: &str) -> (String, String) {
        (suite.to_string(), format!("{}{path}", machine_mirror()))
    }

    #[test]
    fn deb822_as_the_debian_image_writes_it() {
        let files = fixture("deb822");
        assert_eq!(
            suites(&files),
            [
                pair("bookworm", "/debian/"),
                pair("bookworm-updates", "/debian/"),
                pair("bookworm-security", "/debian-security/"),
            ]
        );
        let archive = files.archive("bookworm").unwrap();
        assert_eq!(archive.uri, format!("{}/debian/", machine_mirror()));
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
                pair("bookworm", "/debian/"),
                pair("bookworm-security", "/security/debian-security/"),
                pair("bookworm-updates", "/debian/"),
            ]
        );
    }

    #[test]
    fn disabled_stanzas_other_file_names_and_deb_src_are_not_sources() {
        // `Enabled: no`, a `.sources.disabled` file apt ignores, and a
        // `deb-src` line (source packages only).
        let files = fixture("disabled");
        assert_eq!(suites(&files), [pair("trixie", "/debian/")]);
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
