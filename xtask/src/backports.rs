//! Which release needs a backports suite for the packages setup installs,
//! and adding it to apt's sources on the release's own mirror.
//!
//! Debian 12 (bookworm) alone: its own wireguard-go (0.0.20220316) lacks
//! TUN offloads and is four times slower, its qemu (7.2) conflicts with the
//! backports qemu-utils machines of this kind have, and the VM tier's 6.12
//! kernel is built for it only in bookworm-backports. Debian 13 (trixie)
//! and later ship new enough versions in their own suite; setup checks
//! every package's minimum version after installing, whatever the release.
//! The Dockerfile's runtime stage makes the same decision for its base.

use std::{fs, path::Path};

use anyhow::{Context as _, Result, bail};

use crate::apt::{Source, SourceFiles};

/// The release, as `/etc/os-release` names it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Release {
    /// `ID`: `debian`, `ubuntu`, …
    pub id: String,
    /// `VERSION_ID`: `12`.
    pub version_id: String,
    /// `VERSION_CODENAME`: `bookworm`.
    pub codename: String,
    /// `PRETTY_NAME`, for messages.
    pub pretty_name: String,
}

impl Release {
    pub const OS_RELEASE: &str = "/etc/os-release";

    /// This machine's.
    pub fn system() -> Result<Self> {
        Self::read(Path::new(Self::OS_RELEASE))
    }

    pub fn read(path: &Path) -> Result<Self> {
        let text =
            fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Ok(Self::parse(&text))
    }

    /// os-release(5): `KEY=value` lines, the value maybe quoted; `#`
    /// starts a comment line.
    pub fn parse(text: &str) -> Self {
        let mut release = Self::default();
        for line in text.lines().map(str::trim) {
            if line.starts_with('#') {
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let value = value.trim();
            let value = ['"', '\'']
                .iter()
                .find_map(|q| value.strip_prefix(*q)?.strip_suffix(*q))
                .unwrap_or(value)
                .to_string();
            match key.trim() {
                "ID" => release.id = value,
                "VERSION_ID" => release.version_id = value,
                "VERSION_CODENAME" => release.codename = value,
                "PRETTY_NAME" => release.pretty_name = value,
                _ => {}
            }
        }
        release
    }

    fn name(&self) -> &str {
        if self.pretty_name.is_empty() {
            &self.id
        } else {
            &self.pretty_name
        }
    }
}

/// The packages that come from the backports suite where there is one,
/// and the versions the release's own suite must have where there is none.
pub const PACKAGES: &[&str] = &["wireguard-go", "wireguard-tools", "qemu-system-x86"];

/// What setup does about a backports suite on a release.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Add `suite` (on the mirror of `release_suite`) and install
    /// [`PACKAGES`] from it.
    Add {
        suite: String,
        release_suite: String,
    },
    /// None: the release's own suites serve, for `reason`.
    None { reason: String },
}

impl Decision {
    pub fn for_release(release: &Release) -> Self {
        let bookworm = release.id == "debian"
            && (release.codename == "bookworm"
                || (release.codename.is_empty() && release.version_id == "12"));
        if bookworm {
            return Self::Add {
                suite: "bookworm-backports".into(),
                release_suite: "bookworm".into(),
            };
        }
        let what = if release.id == "debian" {
            "is not Debian 12"
        } else {
            "is not Debian"
        };
        Self::None {
            reason: format!(
                "{} (from {}) {what}: no backports suite added; {} come from the \
                 release's own suites, and setup checks their versions after installing",
                release.name(),
                Release::OS_RELEASE,
                PACKAGES.join(", ")
            ),
        }
    }

    /// `apt-get install`'s `-t SUITE`, if any.
    pub fn target(&self) -> Option<&str> {
        match self {
            Self::Add { suite, .. } => Some(suite),
            Self::None { .. } => None,
        }
    }
}

/// What [`ensure`] did to apt's sources.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Wrote `file` with `suite`, on the mirror of `mirror_of`.
    Added {
        suite: String,
        file: String,
        mirror_of: Source,
    },
    /// `suite` was among the sources already (at `source.entry`).
    Present { suite: String, source: Source },
    /// The release needs none.
    None { reason: String },
}

impl Change {
    /// Setup's line about it.
    pub fn message(&self) -> String {
        match self {
            Self::Added {
                suite,
                file,
                mirror_of,
            } => format!(
                "added the suite {suite} to apt's sources: wrote {file} \
                 (on the mirror of {}, as {} has it)",
                mirror_of.suite, mirror_of.entry
            ),
            Self::Present { suite, source } => {
                format!(
                    "the suite {suite} is in apt's sources already ({}): unchanged",
                    source.entry
                )
            }
            Self::None { reason } => reason.clone(),
        }
    }
}

/// Carries out `decision` on `files`: for [`Decision::Add`] a deb822 file
/// in `files.parts` unless apt reads the suite already. Idempotent.
pub fn ensure(decision: &Decision, files: &SourceFiles, may_write: bool) -> Result<Change> {
    let (suite, release_suite) = match decision {
        Decision::Add {
            suite,
            release_suite,
        } => (suite, release_suite),
        Decision::None { reason } => {
            return Ok(Change::None {
                reason: reason.clone(),
            });
        }
    };
    if let Some(source) = files.find(suite)? {
        return Ok(Change::Present {
            suite: suite.clone(),
            source,
        });
    }
    let mirror_of = files.archive(release_suite)?;
    let file = files.parts.join(format!("tailguard-{suite}.sources"));
    if !may_write {
        bail!(
            "the suite {suite} is missing from {} and adding it ({}) needs root",
            files.describe(),
            file.display()
        );
    }
    let text = format!(
        "# Added by `cargo xtask setup` (TailGuard): {}.\n\
         Types: deb\nURIs: {}\nSuites: {suite}\nComponents: main\n\
         Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
        PACKAGES.join(", "),
        mirror_of.uri
    );
    fs::write(&file, text).with_context(|| format!("writing {}", file.display()))?;
    Ok(Change::Added {
        suite: suite.clone(),
        file: file.display().to_string(),
        mirror_of,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apt::tests::{fixture, machine_mirror};

    const BOOKWORM: &str = r#"PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"
NAME="Debian GNU/Linux"
VERSION_ID="12"
VERSION="12 (bookworm)"
VERSION_CODENAME=bookworm
ID=debian
"#;
    const TRIXIE: &str = r#"PRETTY_NAME="Debian GNU/Linux 13 (trixie)"
NAME="Debian GNU/Linux"
VERSION_ID="13"
VERSION="13 (trixie)"
VERSION_CODENAME=trixie
DEBIAN_VERSION_FULL=13.1
ID=debian
"#;
    const UBUNTU: &str = r#"PRETTY_NAME="Ubuntu 24.04.3 LTS"
NAME="Ubuntu"
VERSION_ID="24.04"
VERSION="24.04.3 LTS (Noble Numbat)"
VERSION_CODENAME=noble
ID=ubuntu
ID_LIKE=debian
UBUNTU_CODENAME=noble
"#;

    fn decide(os_release: &str) -> Decision {
        Decision::for_release(&Release::parse(os_release))
    }

    #[test]
    fn os_release_as_debian_writes_it() {
        assert_eq!(
            Release::parse(BOOKWORM),
            Release {
                id: "debian".into(),
                version_id: "12".into(),
                codename: "bookworm".into(),
                pretty_name: "Debian GNU/Linux 12 (bookworm)".into(),
            }
        );
    }

    #[test]
    fn debian_12_alone_gets_bookworm_backports() {
        assert_eq!(
            decide(BOOKWORM),
            Decision::Add {
                suite: "bookworm-backports".into(),
                release_suite: "bookworm".into(),
            }
        );
        assert_eq!(decide(BOOKWORM).target(), Some("bookworm-backports"));
        // A bookworm without VERSION_CODENAME (some minimal images).
        assert_eq!(
            decide("ID=debian\nVERSION_ID=\"12\"\n").target(),
            Some("bookworm-backports")
        );
        for other in [TRIXIE, UBUNTU, "ID=debian\nVERSION_CODENAME=forky\n", ""] {
            assert_eq!(decide(other).target(), None, "{other}");
        }
    }

    #[test]
    fn other_releases_are_told_why_they_get_none() {
        assert_eq!(
            decide(TRIXIE),
            Decision::None {
                reason: "Debian GNU/Linux 13 (trixie) (from /etc/os-release) is not Debian 12: \
                         no backports suite added; wireguard-go, wireguard-tools, \
                         qemu-system-x86 come from the release's own suites, and setup checks \
                         their versions after installing"
                    .into()
            }
        );
        let Decision::None { reason } = decide(UBUNTU) else {
            panic!("Ubuntu got a backports suite");
        };
        assert!(
            reason.starts_with("Ubuntu 24.04.3 LTS (from /etc/os-release) is not Debian:"),
            "{reason}"
        );
    }

    #[test]
    fn adding_backports_takes_the_release_mirror_and_a_second_run_changes_nothing() {
        let files = fixture("deb822");
        let decision = decide(BOOKWORM);
        let change = ensure(&decision, &files, true).unwrap();
        let file = files.parts.join("tailguard-bookworm-backports.sources");
        let Change::Added { mirror_of, .. } = &change else {
            panic!("{change:?}");
        };
        assert_eq!(
            change.message(),
            format!(
                "added the suite bookworm-backports to apt's sources: wrote {} (on the mirror \
                 of bookworm, as {} has it)",
                file.display(),
                mirror_of.entry
            )
        );
        assert!(mirror_of.entry.contains("debian.sources"), "{mirror_of:?}");
        // apt itself now reads the suite, on the release's mirror.
        let added = files.find("bookworm-backports").unwrap().unwrap();
        assert_eq!(added.uri, format!("{}/debian/", machine_mirror()));
        let written = fs::read_to_string(&file).unwrap();

        let again = ensure(&decision, &files, true).unwrap();
        assert_eq!(
            again.message(),
            format!(
                "the suite bookworm-backports is in apt's sources already ({}:1): unchanged",
                file.display()
            )
        );
        assert_eq!(fs::read_to_string(&file).unwrap(), written);
    }

    #[test]
    fn a_one_line_release_source_gives_the_mirror_too() {
        let files = fixture("one-line");
        ensure(&decide(BOOKWORM), &files, true).unwrap();
        let added = files.find("bookworm-backports").unwrap().unwrap();
        assert_eq!(added.uri, format!("{}/debian/", machine_mirror()));
    }

    #[test]
    fn without_the_release_source_nothing_is_written_and_the_files_are_named() {
        let files = fixture("none");
        let error = format!("{:#}", ensure(&decide(BOOKWORM), &files, true).unwrap_err());
        assert!(
            error.contains("no `deb` source for the suite bookworm in"),
            "{error}"
        );
        assert!(error.contains(&files.list.display().to_string()), "{error}");
        assert_eq!(fs::read_dir(&files.parts).unwrap().count(), 0);
    }

    #[test]
    fn a_release_without_backports_touches_no_file() {
        let files = fixture("none");
        let change = ensure(&decide(TRIXIE), &files, true).unwrap();
        assert!(matches!(change, Change::None { .. }), "{change:?}");
        assert_eq!(fs::read_dir(&files.parts).unwrap().count(), 0);
    }

    #[test]
    fn adding_needs_root_and_says_so() {
        let files = fixture("deb822");
        let error = format!(
            "{:#}",
            ensure(&decide(BOOKWORM), &files, false).unwrap_err()
        );
        assert!(error.contains("needs root"), "{error}");
        assert!(
            !files
                .parts
                .join("tailguard-bookworm-backports.sources")
                .exists()
        );
    }
}
