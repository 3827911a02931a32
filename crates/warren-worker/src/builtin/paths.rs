//! Paths of `file.*` tasks: relative to the worker's data directory and
//! never leading out of it, whether by `..`, an absolute path or a symlink.

use std::io::ErrorKind;
use std::path::{Component, Path, PathBuf};

use crate::TaskError;

/// `rel` as a list of plain components, or `invalid_args` if it is empty,
/// absolute or climbs with `..`.
fn plain(rel: &str) -> Result<PathBuf, TaskError> {
    let invalid = |why: &str| {
        TaskError::invalid_args(format!(
            "path {rel:?} {why}: give a path relative to the data directory, without '..'"
        ))
    };
    if rel.is_empty() {
        return Err(invalid("is empty"));
    }
    if rel.contains('\0') {
        return Err(invalid("contains a NUL byte"));
    }
    let mut out = PathBuf::new();
    for c in Path::new(rel).components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir => return Err(invalid("climbs out with '..'")),
            Component::RootDir | Component::Prefix(_) => return Err(invalid("is absolute")),
        }
    }
    if out.as_os_str().is_empty() {
        return Err(invalid("names the data directory itself"));
    }
    Ok(out)
}

/// The data directory, created if missing, as a canonical path.
async fn root(data_dir: &Path) -> Result<PathBuf, TaskError> {
    tokio::fs::create_dir_all(data_dir).await.map_err(|e| {
        TaskError::retryable(
            "io",
            format!("cannot create data directory {}: {e}", data_dir.display()),
        )
    })?;
    tokio::fs::canonicalize(data_dir).await.map_err(|e| {
        TaskError::retryable(
            "io",
            format!("cannot resolve data directory {}: {e}", data_dir.display()),
        )
    })
}

fn escapes(rel: &str) -> TaskError {
    TaskError::invalid_args(format!(
        "path {rel:?} leads out of the data directory through a symlink"
    ))
}

/// An existing regular file inside the data directory, for reading.
pub async fn existing_file(data_dir: &Path, rel: &str) -> Result<PathBuf, TaskError> {
    let clean = plain(rel)?;
    let root = root(data_dir).await?;
    let real = match tokio::fs::canonicalize(root.join(&clean)).await {
        Ok(p) => p,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(TaskError::permanent(
                "not_found",
                format!("file {rel:?} does not exist in the data directory"),
            ))
        }
        Err(e) => return Err(TaskError::retryable("io", format!("file {rel:?}: {e}"))),
    };
    if !real.starts_with(&root) {
        return Err(escapes(rel));
    }
    let meta = tokio::fs::metadata(&real)
        .await
        .map_err(|e| TaskError::retryable("io", format!("file {rel:?}: {e}")))?;
    if !meta.is_file() {
        return Err(TaskError::invalid_args(format!(
            "path {rel:?} is not a regular file"
        )));
    }
    Ok(real)
}

/// Where a file of `rel` may be written: its parent directories are
/// created (only below a directory checked to lie inside the data
/// directory), and an existing entry at the path must not be a directory or
/// a symlink leading outside. Returns the path with a canonical parent.
pub async fn writable_file(data_dir: &Path, rel: &str) -> Result<PathBuf, TaskError> {
    let clean = plain(rel)?;
    let root = root(data_dir).await?;
    let name = clean
        .file_name()
        .expect("a plain relative path ends in a name")
        .to_owned();
    let parent_rel = clean.parent().unwrap_or(Path::new(""));
    // Walk down to the deepest existing ancestor and check it, so no
    // directory is ever created through a symlink that leads outside.
    let mut existing = root.clone();
    let mut missing = Vec::new();
    for part in parent_rel.components() {
        if missing.is_empty() {
            let next = existing.join(part);
            match tokio::fs::canonicalize(&next).await {
                Ok(real) => {
                    if !real.starts_with(&root) {
                        return Err(escapes(rel));
                    }
                    if !tokio::fs::metadata(&real).await.is_ok_and(|m| m.is_dir()) {
                        return Err(TaskError::invalid_args(format!(
                            "path {rel:?}: {} is not a directory",
                            next.strip_prefix(&root).unwrap_or(&next).display()
                        )));
                    }
                    existing = real;
                    continue;
                }
                Err(e) if e.kind() == ErrorKind::NotFound => {}
                Err(e) => return Err(TaskError::retryable("io", format!("path {rel:?}: {e}"))),
            }
        }
        missing.push(part);
    }
    let mut parent = existing;
    for part in missing {
        parent.push(part);
        match tokio::fs::create_dir(&parent).await {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
            Err(e) => {
                return Err(TaskError::retryable(
                    "io",
                    format!("cannot create directory for {rel:?}: {e}"),
                ))
            }
        }
    }
    // Check again: a directory made meanwhile by someone else could be a link.
    let parent = tokio::fs::canonicalize(&parent)
        .await
        .map_err(|e| TaskError::retryable("io", format!("path {rel:?}: {e}")))?;
    if !parent.starts_with(&root) {
        return Err(escapes(rel));
    }
    let target = parent.join(name);
    if let Ok(meta) = tokio::fs::symlink_metadata(&target).await {
        if meta.is_dir() {
            return Err(TaskError::invalid_args(format!(
                "path {rel:?} is a directory"
            )));
        }
        if meta.file_type().is_symlink() {
            let leads_in = tokio::fs::canonicalize(&target)
                .await
                .is_ok_and(|real| real.starts_with(&root));
            if !leads_in {
                return Err(escapes(rel));
            }
        }
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "warren-paths-{name}-{}",
            uuid::Uuid::new_v4().simple()
        ));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn plain_paths_only() {
        assert_eq!(plain("a/./b.txt").unwrap(), PathBuf::from("a/b.txt"));
        for bad in ["", "/etc/passwd", "../x", "a/../../x", "a/..", ".", "a\0b"] {
            let e = plain(bad).unwrap_err();
            assert_eq!(e.code, "invalid_args", "{bad:?}");
        }
    }

    #[tokio::test]
    async fn writable_creates_parents_inside_and_refuses_links_out() {
        let base = temp_dir("w");
        let data = base.join("data");
        let outside = base.join("outside");
        std::fs::create_dir_all(&outside).unwrap();
        let t = writable_file(&data, "x/y/z.bin").await.unwrap();
        assert!(t.starts_with(data.canonicalize().unwrap()));
        assert!(data.join("x/y").is_dir());

        std::os::unix::fs::symlink(&outside, data.join("out")).unwrap();
        let e = writable_file(&data, "out/new/file").await.unwrap_err();
        assert_eq!(e.code, "invalid_args");
        assert!(!outside.join("new").exists(), "no directory made outside");

        std::os::unix::fs::symlink(outside.join("f"), data.join("link")).unwrap();
        assert_eq!(
            writable_file(&data, "link").await.unwrap_err().code,
            "invalid_args"
        );
        // A link that stays inside is fine.
        std::os::unix::fs::symlink(data.join("x"), data.join("inner")).unwrap();
        assert!(writable_file(&data, "inner/ok").await.is_ok());
        assert_eq!(
            writable_file(&data, "x").await.unwrap_err().code,
            "invalid_args"
        );
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[tokio::test]
    async fn existing_must_be_a_file_inside() {
        let base = temp_dir("e");
        let data = base.join("data");
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(base.join("secret"), b"s").unwrap();
        std::fs::write(data.join("ok"), b"o").unwrap();
        std::os::unix::fs::symlink(base.join("secret"), data.join("link")).unwrap();
        assert!(existing_file(&data, "ok").await.is_ok());
        assert_eq!(
            existing_file(&data, "link").await.unwrap_err().code,
            "invalid_args"
        );
        assert_eq!(
            existing_file(&data, "missing").await.unwrap_err().code,
            "not_found"
        );
        assert_eq!(
            existing_file(&data, "../secret").await.unwrap_err().code,
            "invalid_args"
        );
        std::fs::remove_dir_all(&base).unwrap();
    }
}
