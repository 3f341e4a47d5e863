//! URLs as attribute values: without userinfo, so a repository URL written with a token in it
//! (`https://x-access-token:...@github.com/org/repo`) never reaches a span or a pod's env.

use std::borrow::Cow;

/// `url` without the `user[:password]@` part of its authority; unchanged when it has none
/// (or is not of the `scheme://authority` form).
pub fn without_userinfo(url: Cow<'_, str>) -> Cow<'_, str> {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url;
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    // The last `@` ends the userinfo: a password may hold an unescaped `@`.
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url;
    };
    Cow::Owned(format!("{}{}", &url[..scheme_end], &rest[at + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strip(url: &str) -> String {
        without_userinfo(Cow::Borrowed(url)).into_owned()
    }

    #[test]
    fn userinfo_is_removed_and_the_rest_kept() {
        assert_eq!(
            strip("https://x-access-token:s3cr3t@github.com/org/repo"),
            "https://github.com/org/repo"
        );
        assert_eq!(
            strip("https://user@host:8443/a?b=c@d"),
            "https://host:8443/a?b=c@d"
        );
        assert_eq!(strip("https://us:p@ss@host"), "https://host");
    }

    #[test]
    fn a_url_without_userinfo_is_borrowed_unchanged() {
        for url in [
            "https://github.com/org/repo",
            "https://h/p?q=a@b",
            "git@github.com:org/repo",
        ] {
            let out = without_userinfo(Cow::Borrowed(url));
            assert!(matches!(out, Cow::Borrowed(_)), "{url}");
            assert_eq!(out, url);
        }
    }
}
