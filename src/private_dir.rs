//! Directories only this user may change: the port lock directory and the jobs' run directory
//! hold files other processes trust, so a directory another user owns, or can write to, or a
//! symbolic link put in its place, is refused.
//!
//! The check is made on the open directory (`O_NOFOLLOW`, then `fstat`), and the caller works
//! through that descriptor, so a swap between the check and the use changes nothing.

use std::os::fd::OwnedFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::Mode;

/// Why a directory was not opened.
#[derive(Debug)]
pub(crate) enum DirProblem {
    Io(std::io::Error),
    /// What makes it unsafe, in words.
    Unsafe(String),
}

/// Which mode bits the directory must not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Strictness {
    /// Nobody else may write to it (`0o022` clear).
    NotWritableByOthers,
    /// Nobody else may even look (`0o077` clear: 0700).
    OwnerOnly,
    /// The owner and one group (`gid`, e.g. QEMU's, which creates sockets there) may write, no
    /// one else (`0o002` clear, group `gid` when group-writable); created 0770 with that group.
    SharedWithGroup { gid: u32 },
}

/// Opens `dir`, creating it (mode 0700, or 0770 for [`Strictness::SharedWithGroup`], parents as
/// needed) when `create`; `None` when it does not exist and `create` is false. Refuses a symbolic link, a non-directory, another user's
/// directory, or one with the mode bits `strict` forbids.
pub(crate) fn open(
    dir: &Path,
    create: bool,
    strict: Strictness,
) -> Result<Option<OwnedFd>, DirProblem> {
    if create {
        if let Some(parent) = dir.parent() {
            std::fs::create_dir_all(parent).map_err(DirProblem::Io)?;
        }
        let mode = match strict {
            Strictness::SharedWithGroup { .. } => 0o770,
            _ => 0o700,
        };
        match std::fs::DirBuilder::new().mode(mode).create(dir) {
            Ok(()) => {
                if let Strictness::SharedWithGroup { gid } = strict {
                    // The group first, then the mode the umask may have narrowed.
                    nix::unistd::chown(dir, None, Some(nix::unistd::Gid::from_raw(gid)))
                        .map_err(|e| DirProblem::Io(e.into()))?;
                    std::fs::set_permissions(
                        dir,
                        std::os::unix::fs::PermissionsExt::from_mode(0o770),
                    )
                    .map_err(DirProblem::Io)?;
                }
                tracing::debug!(dir = %dir.display(), "private directory created")
            }
            // Created earlier, or by a process running beside this one: checked below.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(DirProblem::Io(e)),
        }
    }
    let unsafe_dir = |problem: &str| DirProblem::Unsafe(problem.to_string());
    // A first look names what is wrong; the O_NOFOLLOW open is what makes it safe.
    let kind = match std::fs::symlink_metadata(dir) {
        Ok(meta) => meta.file_type(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !create => return Ok(None),
        Err(e) => return Err(DirProblem::Io(e)),
    };
    if kind.is_symlink() {
        return Err(unsafe_dir("it is a symbolic link"));
    }
    if !kind.is_dir() {
        return Err(unsafe_dir("it is not a directory"));
    }
    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let fd = nix::fcntl::open(dir, flags, Mode::empty()).map_err(|errno| match errno {
        Errno::ELOOP | Errno::ENOTDIR => unsafe_dir("it is not a plain directory"),
        other => DirProblem::Io(other.into()),
    })?;
    let stat = nix::sys::stat::fstat(&fd).map_err(|e| DirProblem::Io(e.into()))?;
    let me = nix::unistd::geteuid().as_raw();
    if stat.st_uid != me {
        return Err(DirProblem::Unsafe(format!(
            "it belongs to uid {}, not to this user (uid {me})",
            stat.st_uid
        )));
    }
    let mode = stat.st_mode & 0o7777;
    match strict {
        Strictness::NotWritableByOthers if mode & 0o022 != 0 => Err(DirProblem::Unsafe(format!(
            "it is writable by group or others (mode {mode:04o})"
        ))),
        Strictness::OwnerOnly if mode & 0o077 != 0 => Err(DirProblem::Unsafe(format!(
            "it is open to group or others (mode {mode:04o}; 0700 expected)"
        ))),
        Strictness::SharedWithGroup { .. } if mode & 0o002 != 0 => Err(DirProblem::Unsafe(
            format!("it is writable by others (mode {mode:04o}; 0770 expected)"),
        )),
        Strictness::SharedWithGroup { gid } if mode & 0o020 != 0 && stat.st_gid != gid => {
            Err(DirProblem::Unsafe(format!(
                "it is writable by group {}, not by QEMU's group {gid} alone",
                stat.st_gid
            )))
        }
        _ => Ok(Some(fd)),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode_of(path: &Path) -> u32 {
        std::fs::metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o7777
    }

    fn dir_with_mode(parent: &Path, mode: u32) -> std::path::PathBuf {
        let dir = parent.join("d");
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).expect("chmod");
        dir
    }

    fn refusal(result: Result<Option<OwnedFd>, DirProblem>) -> String {
        match result {
            Err(DirProblem::Unsafe(why)) => why,
            Err(DirProblem::Io(e)) => panic!("an I/O error, not a refusal: {e}"),
            Ok(_) => panic!("opened"),
        }
    }

    #[test]
    fn a_missing_directory_is_created_owner_only_or_none_for_a_reader() {
        let parent = tempfile::tempdir().expect("tempdir");
        let dir = parent.path().join("a/b");

        let not_made = open(&dir, false, Strictness::OwnerOnly).expect("open");
        let made = open(&dir, true, Strictness::OwnerOnly).expect("create");

        assert!(not_made.is_none());
        assert!(made.is_some());
        assert_eq!(mode_of(&dir), 0o700);
    }

    #[test]
    fn a_directory_shared_with_a_group_is_created_0770_with_that_group() {
        let parent = tempfile::tempdir().expect("tempdir");
        let dir = parent.path().join("shared");
        let gid = nix::unistd::getegid().as_raw();

        open(&dir, true, Strictness::SharedWithGroup { gid }).expect("create");

        assert_eq!(mode_of(&dir), 0o770);
    }

    #[test]
    fn a_symbolic_link_in_place_of_the_directory_is_refused() {
        let parent = tempfile::tempdir().expect("tempdir");
        let target = dir_with_mode(parent.path(), 0o700);
        let link = parent.path().join("link");
        std::os::unix::fs::symlink(&target, &link).expect("symlink");

        let why = refusal(open(&link, true, Strictness::OwnerOnly));

        assert!(why.contains("symbolic link"), "{why}");
    }

    #[test]
    fn another_users_directory_is_refused_naming_its_owner() {
        let parent = tempfile::tempdir().expect("tempdir");
        let dir = dir_with_mode(parent.path(), 0o700);
        let nobody = nix::unistd::User::from_name("nobody")
            .expect("passwd")
            .expect("user nobody");
        nix::unistd::chown(&dir, Some(nobody.uid), None).expect("chown to nobody");

        let why = refusal(open(&dir, false, Strictness::NotWritableByOthers));

        assert!(why.contains(&format!("uid {}", nobody.uid)), "{why}");
    }

    #[test]
    fn each_strictness_refuses_the_mode_bits_it_forbids() {
        let gid = nix::unistd::getegid().as_raw();
        let cases = [
            (Strictness::NotWritableByOthers, 0o775, false),
            (Strictness::NotWritableByOthers, 0o755, true),
            (Strictness::OwnerOnly, 0o750, false),
            (Strictness::OwnerOnly, 0o700, true),
            (Strictness::SharedWithGroup { gid }, 0o777, false),
            (Strictness::SharedWithGroup { gid }, 0o770, true),
            (Strictness::SharedWithGroup { gid: gid + 1 }, 0o770, false),
        ];
        for (strict, mode, ok) in cases {
            let parent = tempfile::tempdir().expect("tempdir");
            let dir = dir_with_mode(parent.path(), mode);

            let opened = open(&dir, false, strict);

            assert_eq!(
                matches!(opened, Ok(Some(_))),
                ok,
                "{strict:?} with mode {mode:04o}"
            );
        }
    }
}
