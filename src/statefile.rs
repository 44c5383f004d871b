//! Files the gateway keeps in `server.state_dir` (admin keys, quota counts, the cluster
//! epoch): replaced whole and durably, so a crash leaves the old content or the new one,
//! never a torn or empty file that would stop the next start.

use std::io::Write;
use std::path::Path;

/// Replaces `path` with `body`: a temporary file beside it (`.json.tmp`), fsync, rename over
/// `path`, then fsync of the directory (creating the directory when it is missing).
pub fn write_atomic(path: &Path, body: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(body)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_and_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("ringgate-statefile-{}", std::process::id()));
        let path = dir.join("sub").join("x.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert!(!path.with_extension("json.tmp").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
