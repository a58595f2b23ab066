//! Where the CloudStack keys come from, in this order: `provider.credentials_file` (owner-only; an
//! ssh_scale.py `.idcfrc`, a `cs` `.cloudstack.ini` or a cloudmonkey `config`), the environment
//! (`CLOUDSTACK_ENDPOINT`, `CLOUDSTACK_KEY`, `CLOUDSTACK_SECRET`, as `cs` reads them), then
//! `~/.cloudstack.ini`. `provider.endpoint`, if set, wins over the endpoint found with the keys.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::api::Credentials;

/// An INI file: sections of `key = value` (or `key=value`) lines; `#` and `;` start comments. Keys before
/// any section are in the section named "".
pub type Ini = BTreeMap<String, BTreeMap<String, String>>;

pub fn parse_ini(text: &str) -> Ini {
    let mut ini = Ini::new();
    let mut section = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().to_string();
            ini.entry(section.clone()).or_default();
        } else if let Some((key, value)) = line.split_once('=') {
            ini.entry(section.clone())
                .or_default()
                .insert(key.trim().to_string(), value.trim().to_string());
        }
    }
    ini
}

/// The keys in `ini`, whichever of the three layouts it has.
fn from_ini(ini: &Ini) -> Option<Credentials> {
    let get = |section: &BTreeMap<String, String>, keys: [&str; 3]| {
        Some(Credentials {
            endpoint: section.get(keys[0])?.clone(),
            api_key: section.get(keys[1])?.clone(),
            secret_key: section.get(keys[2])?.clone(),
        })
    };
    // ssh_scale.py / idcf-compute-api: [account] host, api_key, secret_key.
    if let Some(found) = ini
        .get("account")
        .and_then(|s| get(s, ["host", "api_key", "secret_key"]))
    {
        return Some(found);
    }
    // cs: [cloudstack] endpoint, key, secret.
    if let Some(found) = ini
        .get("cloudstack")
        .and_then(|s| get(s, ["endpoint", "key", "secret"]))
    {
        return Some(found);
    }
    // cloudmonkey: the profile [core] names, else any section with url, apikey, secretkey.
    let profile = ini.get("core").and_then(|core| core.get("profile"));
    profile
        .and_then(|p| ini.get(p))
        .and_then(|s| get(s, ["url", "apikey", "secretkey"]))
        .or_else(|| ini.values().find_map(|s| get(s, ["url", "apikey", "secretkey"])))
}

/// Reads keys from `path`, which must be readable by its owner only.
pub fn from_file(path: &Path) -> Result<Credentials, String> {
    use std::os::unix::fs::PermissionsExt;
    let metadata = std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if metadata.permissions().mode() & 0o077 != 0 {
        return Err(format!(
            "{} holds the CloudStack secret key but others can read it: run `chmod 600 {}`",
            path.display(),
            path.display()
        ));
    }
    let text = crate::config::read_operator_file(path, crate::config::MAX_SMALL_FILE_BYTES)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    from_ini(&parse_ini(&text)).ok_or_else(|| {
        format!(
            "{} has no CloudStack keys: expected [account] host, api_key, secret_key (.idcfrc), [cloudstack] endpoint, key, secret (.cloudstack.ini) or url, apikey, secretkey (cloudmonkey)",
            path.display()
        )
    })
}

/// The keys for `credentials_file` or, without one, from the environment or `~/.cloudstack.ini`.
pub fn load(credentials_file: Option<&Path>, endpoint: Option<&str>) -> Result<Credentials, String> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let home_ini = std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cloudstack.ini"));
    let mut found = if let Some(path) = credentials_file {
        from_file(path)?
    } else if let (Some(endpoint), Some(api_key), Some(secret_key)) = (
        env("CLOUDSTACK_ENDPOINT"),
        env("CLOUDSTACK_KEY"),
        env("CLOUDSTACK_SECRET"),
    ) {
        Credentials {
            endpoint,
            api_key,
            secret_key,
        }
    } else if let Some(path) = home_ini.filter(|p| p.exists()) {
        from_file(&path)?
    } else {
        return Err("no CloudStack keys: set provider.credentials_file (an .idcfrc or .cloudstack.ini, mode 600), or CLOUDSTACK_ENDPOINT, CLOUDSTACK_KEY and CLOUDSTACK_SECRET".into());
    };
    if let Some(endpoint) = endpoint {
        found.endpoint = endpoint.to_string();
    }
    if !found.endpoint.starts_with("https://") && !found.endpoint.starts_with("http://") {
        return Err(format!(
            "the CloudStack endpoint `{}` must be a URL like https://HOST/client/api",
            found.endpoint
        ));
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn private_file(dir: &Path, name: &str, text: &str, mode: u32) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn reads_an_idcfrc_a_cloudstack_ini_and_a_cloudmonkey_config() {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in [
            (
                "idcfrc",
                "[account]\nhost=https://cs.example/client/api\napi_key=K\nsecret_key=S\n\n[scaling]\nmin_size=2\n",
            ),
            (
                "cs.ini",
                "[cloudstack]\nendpoint = https://cs.example/client/api\nkey = K\nsecret = S\n",
            ),
            (
                "cloudmonkey",
                "[core]\nprofile = prod\n\n[lab]\nurl = https://lab/client/api\napikey = X\nsecretkey = Y\n\n[prod]\nurl = https://cs.example/client/api\napikey = K\nsecretkey = S\n",
            ),
        ] {
            let path = private_file(dir.path(), name, text, 0o600);
            let found = load(Some(&path), None).unwrap();
            assert_eq!(
                found,
                Credentials {
                    endpoint: "https://cs.example/client/api".into(),
                    api_key: "K".into(),
                    secret_key: "S".into(),
                },
                "{name}"
            );
        }
        let path = dir.path().join("idcfrc");
        let found = load(Some(&path), Some("https://other/client/api")).unwrap();
        assert_eq!(
            found.endpoint, "https://other/client/api",
            "the configured endpoint wins"
        );
    }

    #[test]
    fn a_file_others_can_read_or_without_keys_is_refused_with_the_fix() {
        let dir = tempfile::tempdir().unwrap();
        let open = private_file(
            dir.path(),
            "open",
            "[account]\nhost=https://x\napi_key=K\nsecret_key=S\n",
            0o644,
        );
        let error = load(Some(&open), None).unwrap_err();
        assert!(error.contains("chmod 600"), "{error}");
        assert!(!error.contains("S\n"), "{error}");
        let empty = private_file(dir.path(), "empty", "[scaling]\nmin_size=2\n", 0o600);
        assert!(load(Some(&empty), None).unwrap_err().contains("has no CloudStack keys"));
    }
}
