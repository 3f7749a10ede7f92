//! Keys and the token secret: from config, or generated once into the data directory.

use std::io::Write;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::Config;

/// The process's keys.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Secrets {
    /// The admin key.
    pub admin_key: String,
    /// The ad-server key.
    pub ad_server_key: String,
    /// The token-signing secret.
    pub token_secret: String,
}

/// The file generated secrets are kept in.
pub fn secrets_path(data_dir: &Path) -> PathBuf {
    data_dir.join("secrets.toml")
}

/// A new random key with a readable prefix: 256 bits from the OS-seeded CSPRNG.
pub fn generate_key(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// SHA-256 of an API key. Keys are 256 random bits, so a fast hash suffices: there is
/// nothing to brute-force that a slow hash would protect.
pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

impl Secrets {
    /// The configured secrets; those left empty are read from (or generated into)
    /// `<data_dir>/secrets.toml`, created with mode 0600.
    pub fn load_or_generate(config: &Config) -> anyhow::Result<(Secrets, PathBuf)> {
        let path = secrets_path(&config.data_dir);
        let stored: Option<Secrets> = match std::fs::read_to_string(&path) {
            Ok(text) => Some(
                toml::from_str(&text)
                    .map_err(|e| anyhow::anyhow!("invalid secrets file {}: {e}", path.display()))?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => anyhow::bail!("cannot read {}: {e}", path.display()),
        };
        let generated = stored.clone().unwrap_or_else(|| Secrets {
            admin_key: generate_key("cka_"),
            ad_server_key: generate_key("cks_"),
            token_secret: generate_key(""),
        });
        if stored.is_none() {
            std::fs::create_dir_all(&config.data_dir)?;
            write_private(&path, &toml::to_string(&generated)?)?;
        }
        let pick = |configured: &str, fallback: &str| {
            if configured.is_empty() {
                fallback.to_owned()
            } else {
                configured.to_owned()
            }
        };
        Ok((
            Secrets {
                admin_key: pick(&config.keys.admin_key, &generated.admin_key),
                ad_server_key: pick(&config.keys.ad_server_key, &generated.ad_server_key),
                token_secret: pick(&config.keys.token_secret, &generated.token_secret),
            },
            path,
        ))
    }
}

impl Secrets {
    /// Fresh random keys for a process that serves no authenticated route: nobody knows
    /// them, so nothing can authenticate against it.
    pub fn unusable() -> Secrets {
        Secrets {
            admin_key: generate_key("unused_"),
            ad_server_key: generate_key("unused_"),
            token_secret: generate_key(""),
        }
    }

    /// The configured secrets, all required: processes on several machines must share
    /// them, so none may be generated locally (the production processes).
    pub fn from_config(config: &Config) -> anyhow::Result<Secrets> {
        let k = &config.keys;
        for (value, key, var) in [
            (&k.admin_key, "keys.admin_key", "CLICKAGG_ADMIN_KEY"),
            (
                &k.ad_server_key,
                "keys.ad_server_key",
                "CLICKAGG_AD_SERVER_KEY",
            ),
            (
                &k.token_secret,
                "keys.token_secret",
                "CLICKAGG_TOKEN_SECRET",
            ),
        ] {
            if value.is_empty() {
                anyhow::bail!(
                    "{key} is empty; the production processes share their keys and the token \
                     secret, so set it in the config file or with {var}"
                );
            }
        }
        if k.token_secret.len() < 16 {
            anyhow::bail!("keys.token_secret is shorter than 16 bytes; use a long random secret");
        }
        Ok(Secrets {
            admin_key: k.admin_key.clone(),
            ad_server_key: k.ad_server_key.clone(),
            token_secret: k.token_secret.clone(),
        })
    }
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut f = options.open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_secrets_persist_and_config_wins() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut config = Config::load_with_env(None, |_| None).expect("defaults");
        config.data_dir = dir.path().to_owned();
        let (a, path) = Secrets::load_or_generate(&config).expect("generate");
        assert!(a.admin_key.starts_with("cka_") && a.admin_key.len() > 40);
        let (b, _) = Secrets::load_or_generate(&config).expect("reload");
        assert_eq!(a.admin_key, b.admin_key, "generated once, then reused");
        config.keys.admin_key = "from-config".into();
        let (c, _) = Secrets::load_or_generate(&config).expect("reload");
        assert_eq!(c.admin_key, "from-config");
        assert_eq!(c.token_secret, a.token_secret);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn key_hashes_differ_per_key() {
        assert_ne!(hash_key(&generate_key("x")), hash_key(&generate_key("x")));
        assert_eq!(hash_key("a"), hash_key("a"));
    }
}
