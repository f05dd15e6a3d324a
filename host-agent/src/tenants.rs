//! Tenant identities: which bearer token belongs to which tenant.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use rcsync_core::config::{ConfigError, Problem};
use rcsync_core::{TenantName, TenantsFile};

/// The bearer tokens of the tenants that have one, read from their `tokenFile`s.
///
/// A token file holds one token per line (surrounding whitespace and empty lines ignored), every
/// one of them the tenant's: a token is rotated without an outage by adding the new one as a
/// second line, moving the virtual side to it, then removing the old line (its streams then end,
/// see [`crate::grpc::auth`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TenantTokens {
    /// Each token once: a caller's [`crate::grpc::auth::Caller`] keeps a reference to its own,
    /// to check it again at each reload.
    by_token: HashMap<Arc<str>, TenantName>,
    /// The tokens of each tenant with a `tokenFile`, in the file's order.
    of_tenant: HashMap<TenantName, Vec<Arc<str>>>,
}

impl TenantTokens {
    /// Reads every `tokenFile` of `file` (loaded from `path`). Unreadable files, files without a
    /// token, and tokens shared by two tenants are errors naming the tenant's config path.
    pub fn load(path: &Path, file: &TenantsFile) -> Result<Self, ConfigError> {
        let mut tokens = Self::default();
        let mut problems = Vec::new();
        let mut owner: HashMap<Arc<str>, usize> = HashMap::new();
        for (i, tenant) in file.tenants().iter().enumerate() {
            let Some(token_path) = &tenant.token_file else {
                continue;
            };
            let at = format!("tenants[{i}].tokenFile");
            let raw = match std::fs::read_to_string(token_path) {
                Ok(raw) => raw,
                Err(e) => {
                    problems.push(Problem {
                        at,
                        message: format!("cannot read {}: {e}", token_path.display()),
                    });
                    continue;
                }
            };
            let (mut own, reported) = (Vec::new(), problems.len());
            for (line, token) in raw.lines().enumerate() {
                let token: Arc<str> = token.trim().into();
                if token.is_empty() {
                    continue;
                }
                match owner.get(&token) {
                    Some(&first) if first == i => continue,
                    Some(&first) => {
                        problems.push(Problem {
                            at: at.clone(),
                            message: format!(
                                "line {} of {}: tenants[{first}] has the same token: every tenant needs its own",
                                line + 1,
                                token_path.display()
                            ),
                        });
                        continue;
                    }
                    None => {}
                }
                owner.insert(token.clone(), i);
                tokens.by_token.insert(token.clone(), tenant.name.clone());
                own.push(token);
            }
            if !own.is_empty() {
                tokens.of_tenant.insert(tenant.name.clone(), own);
            } else if problems.len() == reported {
                // (A file whose only token is another tenant's was reported as such.)
                problems.push(Problem {
                    at,
                    message: format!("{} is empty", token_path.display()),
                });
            }
        }
        if problems.is_empty() {
            Ok(tokens)
        } else {
            Err(ConfigError {
                file: path.to_path_buf(),
                problems,
            })
        }
    }

    /// The tenant a token belongs to.
    pub fn tenant_of(&self, token: &str) -> Option<&TenantName> {
        self.by_token.get(token)
    }

    /// The tenant a token belongs to, with the agent's own copy of the token.
    pub fn entry_of(&self, token: &str) -> Option<(&Arc<str>, &TenantName)> {
        self.by_token.get_key_value(token)
    }

    /// Whether a tenant is configured with a token.
    pub fn has_token(&self, tenant: &TenantName) -> bool {
        self.of_tenant.contains_key(tenant)
    }

    /// A tenant's tokens (more than one while a token is rotated; none without a `tokenFile`).
    pub fn tokens_of(&self, tenant: &TenantName) -> &[Arc<str>] {
        self.of_tenant.get(tenant).map_or(&[], Vec::as_slice)
    }

    /// How many tokens a tenant has.
    pub fn count_of(&self, tenant: &TenantName) -> usize {
        self.tokens_of(tenant).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(files: &[(&str, &str)]) -> Result<TenantTokens, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let mut yaml = String::from("tenants:\n");
        for (tenant, token) in files {
            let file = dir.path().join(format!("{tenant}.token"));
            std::fs::write(&file, token).unwrap();
            yaml += &format!(
                "  - {{name: {tenant}, hostNamespace: ns-{tenant}, tokenFile: {}}}\n",
                file.display()
            );
        }
        let path = dir.path().join("tenants.yaml");
        TenantTokens::load(&path, &TenantsFile::parse(&path, &yaml).unwrap())
    }

    #[test]
    fn every_line_of_a_token_file_is_one_of_the_tenants_tokens() {
        let tokens = load(&[("a", "  old\n\n new \n"), ("b", "other")]).unwrap();
        let a = TenantName::new("a").unwrap();
        assert_eq!(tokens.tenant_of("old"), Some(&a));
        assert_eq!(tokens.tenant_of("new"), Some(&a));
        assert_eq!(tokens.count_of(&a), 2);
        assert_eq!(tokens.tenant_of("other").map(TenantName::as_str), Some("b"));
        assert_eq!(tokens.tenant_of("old\n new"), None);
        // The same token twice in one file is one token.
        assert_eq!(load(&[("a", "t\nt\n")]).unwrap().count_of(&a), 1);
    }

    #[test]
    fn an_empty_token_file_or_a_token_of_two_tenants_is_an_error_naming_where() {
        let empty = load(&[("a", " \n\n")]).unwrap_err().to_string();
        assert!(
            empty.contains("tenants[0].tokenFile") && empty.contains("is empty"),
            "{empty}"
        );
        let shared = load(&[("a", "x\ny"), ("b", "z\ny")]).unwrap_err().to_string();
        assert!(
            shared.contains("tenants[1].tokenFile")
                && shared.contains("line 2 of")
                && shared.contains("tenants[0] has the same token"),
            "{shared}"
        );
    }
}
