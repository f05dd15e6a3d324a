//! Bearer tokens kept in files (a mounted Secret): read, trimmed, never empty.
//!
//! ```text
//!   /var/run/secrets/…/token ──read_token_file(path, what)──► "s3cret"   (or an error naming what and where)
//! ```

use std::path::{Path, PathBuf};

/// A token file that cannot be used; `what` names its role ("token file", "admin token file").
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// The file cannot be read.
    #[error("reading the {what} {}: {source}", path.display())]
    Read {
        /// The file's role.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file holds only whitespace.
    #[error("the {what} {} is empty", path.display())]
    Empty {
        /// The file's role.
        what: &'static str,
        /// The file.
        path: PathBuf,
    },
}

/// The token in `path`, surrounding whitespace trimmed; `what` names the file in errors.
pub fn read_token_file(path: &Path, what: &'static str) -> Result<String, TokenFileError> {
    let raw = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })?;
    let token = raw.trim();
    if token.is_empty() {
        return Err(TokenFileError::Empty {
            what,
            path: path.to_path_buf(),
        });
    }
    Ok(token.to_string())
}
