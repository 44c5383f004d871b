//! Unit tests of the router: matching precedence, parameters, methods, conflicts.

use super::*;

fn router(routes: &[(Option<&str>, &str, u32)]) -> Router<u32> {
    let mut r = Router::new();
    for &(m, p, v) in routes {
        r.insert(m, p, v).unwrap_or_else(|e| panic!("{e}"));
    }
    r
}

/// Looks up and returns the value plus the captured substrings.
fn get<'p>(r: &Router<u32>, method: &str, path: &'p str) -> Option<(u32, Vec<&'p str>)> {
    let mut params = Params::new();
    match r.lookup(method, path, &mut params) {
        Match::Found(v) => {
            let caps = (0..params.len())
                .map(|i| {
                    let (s, e) = params.get(i).unwrap();
                    &path[s as usize..e as usize]
                })
                .collect();
            Some((*v, caps))
        }
        _ => {
            assert!(params.is_empty());
            None
        }
    }
}

fn status(r: &Router<u32>, method: &str, path: &str) -> Match<'static, u32> {
    match r.lookup(method, path, &mut Params::new()) {
        Match::Found(_) => panic!("unexpected match for {method} {path}"),
        Match::MethodNotAllowed => Match::MethodNotAllowed,
        Match::NotFound => Match::NotFound,
    }
}

fn err(method: Option<&str>, pattern: &str, existing: &[(Option<&str>, &str)]) -> String {
    let mut r = Router::new();
    for &(m, p) in existing {
        r.insert(m, p, 0).unwrap();
    }
    let e = r.insert(method, pattern, 1).unwrap_err().to_string();
    assert_eq!(
        r.len(),
        existing.len(),
        "failed insert must not add a route"
    );
    e
}

#[test]
fn static_routes_and_root() {
    let r = router(&[
        (Some("GET"), "/", 1),
        (Some("GET"), "/a", 2),
        (Some("GET"), "/a/", 3),
        (Some("GET"), "/a/b", 4),
    ]);
    assert_eq!(get(&r, "GET", "/"), Some((1, vec![])));
    assert_eq!(get(&r, "GET", "/a"), Some((2, vec![])));
    assert_eq!(get(&r, "GET", "/a/"), Some((3, vec![])));
    assert_eq!(get(&r, "GET", "/a/b"), Some((4, vec![])));
    assert_eq!(get(&r, "GET", "/a/b/"), None);
    assert_eq!(get(&r, "GET", "/A"), None, "case-sensitive");
    assert_eq!(get(&r, "GET", "/a%2Fb"), None, "no decoding");
    assert_eq!(get(&r, "GET", ""), None);
    assert_eq!(get(&r, "GET", "a"), None);
    assert_eq!(r.len(), 4);
    assert!(!r.is_empty());
    assert!(Router::<u32>::new().is_empty());
}

#[test]
fn trailing_slash_matters() {
    let r = router(&[(Some("GET"), "/a", 1), (Some("GET"), "/b/", 2)]);
    assert_eq!(status(&r, "GET", "/a/"), Match::NotFound);
    assert_eq!(status(&r, "GET", "/b"), Match::NotFound);
    assert_eq!(get(&r, "GET", "/b/"), Some((2, vec![])));
}

#[test]
fn static_beats_param_beats_greedy() {
    let r = router(&[
        (Some("GET"), "/a/b", 1),
        (Some("GET"), "/a/{x}", 2),
        (Some("GET"), "/a/{rest+}", 3),
    ]);
    assert_eq!(get(&r, "GET", "/a/b"), Some((1, vec![])));
    assert_eq!(get(&r, "GET", "/a/c"), Some((2, vec!["c"])));
    assert_eq!(get(&r, "GET", "/a/c/d"), Some((3, vec!["c/d"])));
    assert_eq!(get(&r, "GET", "/a/b/"), Some((3, vec!["b/"])));
}

#[test]
fn backtracking_static_to_param_to_greedy() {
    let r = router(&[
        (Some("GET"), "/a/b/d", 1),
        (Some("GET"), "/a/{x}/c", 2),
        (Some("GET"), "/a/{rest+}", 3),
    ]);
    assert_eq!(get(&r, "GET", "/a/b/d"), Some((1, vec![])));
    // Static `b` dead-ends at `c`: backtrack to `{x}`.
    assert_eq!(get(&r, "GET", "/a/b/c"), Some((2, vec!["b"])));
    // Both dead-end: greedy.
    assert_eq!(get(&r, "GET", "/a/b/e"), Some((3, vec!["b/e"])));
    assert_eq!(get(&r, "GET", "/a/b"), Some((3, vec!["b"])));
}

#[test]
fn backtracking_restores_params() {
    let r = router(&[
        (Some("GET"), "/{a}/{b}/x", 1),
        (Some("GET"), "/{a}/q/{c}/y", 2),
        (Some("GET"), "/{a}/{rest+}", 3),
    ]);
    assert_eq!(get(&r, "GET", "/1/q/x"), Some((1, vec!["1", "q"])));
    assert_eq!(get(&r, "GET", "/1/q/3/y"), Some((2, vec!["1", "3"])));
    // `q` static then `{b}` both dead-end; captures from them are dropped.
    assert_eq!(get(&r, "GET", "/1/q/3/z"), Some((3, vec!["1", "q/3/z"])));
}

#[test]
fn backtracking_through_deeper_levels() {
    let r = router(&[
        (Some("GET"), "/{x}/b/c/d", 1),
        (Some("GET"), "/a/b/c/e", 2),
        (Some("GET"), "/a/{y}/c/d/f", 3),
    ]);
    assert_eq!(get(&r, "GET", "/a/b/c/d"), Some((1, vec!["a"])));
    assert_eq!(get(&r, "GET", "/a/b/c/e"), Some((2, vec![])));
    assert_eq!(get(&r, "GET", "/a/b/c/d/f"), Some((3, vec!["b"])));
}

#[test]
fn param_matches_one_non_empty_segment() {
    let r = router(&[(Some("GET"), "/a/{x}", 1), (Some("GET"), "/a/{x}/b", 2)]);
    assert_eq!(get(&r, "GET", "/a/"), None);
    assert_eq!(get(&r, "GET", "/a/x/y"), None);
    assert_eq!(get(&r, "GET", "/a//b"), None);
    assert_eq!(get(&r, "GET", "/a/%20/b"), Some((2, vec!["%20"])));
}

#[test]
fn greedy_captures_slashes_and_is_never_empty() {
    let r = router(&[
        (Some("GET"), "/files/{path+}", 1),
        (Some("GET"), "/{all+}", 2),
    ]);
    assert_eq!(get(&r, "GET", "/files/a"), Some((1, vec!["a"])));
    assert_eq!(
        get(&r, "GET", "/files/a/b/c.txt"),
        Some((1, vec!["a/b/c.txt"]))
    );
    assert_eq!(get(&r, "GET", "/files//x/"), Some((1, vec!["/x/"])));
    // `/files/` leaves nothing for `{path+}`; the root greedy takes it.
    assert_eq!(get(&r, "GET", "/files/"), Some((2, vec!["files/"])));
    assert_eq!(get(&r, "GET", "/files"), Some((2, vec!["files"])));
    assert_eq!(status(&r, "GET", "/"), Match::NotFound);

    let r = router(&[(Some("GET"), "/files/{path+}", 1)]);
    assert_eq!(status(&r, "GET", "/files/"), Match::NotFound);
    assert_eq!(status(&r, "GET", "/files"), Match::NotFound);
}

#[test]
fn param_offsets_are_byte_offsets_in_pattern_order() {
    let r = router(&[(Some("GET"), "/v1/users/{id}/orders/{order}/{rest+}", 7)]);
    let path = "/v1/users/42/orders/abc/x/y";
    let mut p = Params::new();
    assert_eq!(r.lookup("GET", path, &mut p), Match::Found(&7));
    assert_eq!(p.len(), 3);
    assert_eq!(p.get(0), Some((10, 12)));
    assert_eq!(p.get(1), Some((20, 23)));
    assert_eq!(p.get(2), Some((24, 27)));
    assert_eq!(p.get(3), None);
    assert_eq!(p.as_slice(), &[(10, 12), (20, 23), (24, 27)]);
    // Multi-byte UTF-8 offsets are in bytes.
    assert_eq!(
        get(&r, "GET", "/v1/users/é/orders/ü/ß"),
        Some((7, vec!["é", "ü", "ß"]))
    );
    // A later lookup resets previous captures.
    assert_eq!(r.lookup("GET", "/nope", &mut p), Match::NotFound);
    assert!(p.is_empty());
    p.clear();
    assert_eq!(p.len(), 0);
}

#[test]
fn sixteen_params() {
    let pattern: String = (0..16).map(|i| format!("/{{p{i}}}")).collect();
    let path: String = (0..16).map(|i| format!("/{i}")).collect();
    let r = router(&[(Some("GET"), &pattern, 1)]);
    let want: Vec<String> = (0..16).map(|i| i.to_string()).collect();
    let (v, caps) = get(&r, "GET", &path).unwrap();
    assert_eq!((v, caps), (1, want.iter().map(|s| s.as_str()).collect()));
    let too_many = format!("{pattern}/{{p16}}");
    assert!(err(Some("GET"), &too_many, &[]).contains("more than 16 parameters"));
}

#[test]
fn method_not_allowed_vs_not_found() {
    let r = router(&[(Some("GET"), "/a", 1), (Some("POST"), "/a", 2)]);
    assert_eq!(get(&r, "GET", "/a"), Some((1, vec![])));
    assert_eq!(get(&r, "POST", "/a"), Some((2, vec![])));
    assert_eq!(status(&r, "PUT", "/a"), Match::MethodNotAllowed);
    assert_eq!(
        status(&r, "get", "/a"),
        Match::MethodNotAllowed,
        "case-sensitive"
    );
    assert_eq!(status(&r, "PUT", "/b"), Match::NotFound);
    assert_eq!(status(&r, "GET", "/a/"), Match::NotFound);
}

#[test]
fn head_is_answered_by_a_get_route() {
    let r = router(&[
        (Some("GET"), "/a", 1),
        (Some("HEAD"), "/b", 2),
        (Some("GET"), "/b", 3),
        (None, "/c", 4),
        (Some("GET"), "/c", 5),
        (Some("POST"), "/d", 6),
        (Some("GET"), "/e/{x}", 7),
        (None, "/e/{rest+}", 8),
    ]);
    assert_eq!(get(&r, "HEAD", "/a"), Some((1, vec![])));
    // An explicit HEAD route wins; GET wins over ANY; GET at a deeper branch wins over ANY.
    assert_eq!(get(&r, "HEAD", "/b"), Some((2, vec![])));
    assert_eq!(get(&r, "HEAD", "/c"), Some((5, vec![])));
    assert_eq!(get(&r, "HEAD", "/e/1"), Some((7, vec!["1"])));
    assert_eq!(status(&r, "HEAD", "/d"), Match::MethodNotAllowed);
    // Only HEAD borrows GET's routes.
    assert_eq!(status(&r, "OPTIONS", "/a"), Match::MethodNotAllowed);
}

#[test]
fn allowed_methods_gather_every_matching_route() {
    let r = router(&[
        (Some("GET"), "/a", 1),
        (Some("POST"), "/a", 2),
        (Some("PUT"), "/a/{x}", 3),
        (Some("DELETE"), "/a/{rest+}", 4),
        (Some("PATCH"), "/b", 5),
        (None, "/c", 6),
    ]);
    let names = |p: &str| -> Vec<String> {
        r.allowed_methods(p)
            .iter()
            .map(|m| String::from_utf8_lossy(m).into_owned())
            .collect()
    };
    assert_eq!(names("/a"), ["GET", "HEAD", "POST"]);
    // Every branch that matches the path: the parameter and the greedy route.
    assert_eq!(names("/a/1"), ["DELETE", "PUT"]);
    assert_eq!(names("/a/1/2"), ["DELETE"]);
    assert_eq!(names("/b"), ["PATCH"]);
    // ANY takes every method but TRACE: its 405 lists what ANY stands for.
    assert_eq!(
        names("/c"),
        ["DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT"]
    );
    assert_eq!(get(&r, "PROPFIND", "/c"), Some((6, vec![])));
    assert_eq!(status(&r, "TRACE", "/c"), Match::MethodNotAllowed);
    assert!(names("/nothing").is_empty());
    assert!(names("").is_empty());
}

#[test]
fn method_mismatch_falls_back_to_lower_priority_branch() {
    let r = router(&[(Some("GET"), "/a/{x}", 1), (Some("POST"), "/a/b", 2)]);
    assert_eq!(get(&r, "GET", "/a/b"), Some((1, vec!["b"])));
    assert_eq!(get(&r, "POST", "/a/b"), Some((2, vec![])));
    assert_eq!(status(&r, "POST", "/a/c"), Match::MethodNotAllowed);
    assert_eq!(status(&r, "PUT", "/a/b"), Match::MethodNotAllowed);

    let r = router(&[(Some("POST"), "/a/b", 1), (Some("GET"), "/a/{rest+}", 2)]);
    assert_eq!(get(&r, "GET", "/a/b"), Some((2, vec!["b"])));
    assert_eq!(status(&r, "DELETE", "/a/b"), Match::MethodNotAllowed);
    assert_eq!(status(&r, "POST", "/a/b/c"), Match::MethodNotAllowed);
}

#[test]
fn any_fallback() {
    let r = router(&[
        (None, "/a", 1),
        (Some("GET"), "/a", 2),
        (None, "/b/{x}", 3),
        (Some("GET"), "/b/c", 4),
    ]);
    assert_eq!(get(&r, "GET", "/a"), Some((2, vec![])));
    assert_eq!(get(&r, "POST", "/a"), Some((1, vec![])));
    assert_eq!(get(&r, "BREW", "/a"), Some((1, vec![])));
    // Exact method on the static route, else ANY on the param route.
    assert_eq!(get(&r, "GET", "/b/c"), Some((4, vec![])));
    assert_eq!(get(&r, "POST", "/b/c"), Some((3, vec!["c"])));
    // ANY on a higher-priority route wins over an exact method lower down.
    let r = router(&[(None, "/a/b", 1), (Some("GET"), "/a/{x}", 2)]);
    assert_eq!(get(&r, "GET", "/a/b"), Some((1, vec![])));
}

#[test]
fn wide_nodes_switch_to_map() {
    let mut r = Router::new();
    for i in 0..50u32 {
        r.insert(Some("GET"), &format!("/s{i}"), i).unwrap();
        r.insert(Some("GET"), &format!("/s{i}/x"), 100 + i).unwrap();
    }
    r.insert(Some("GET"), "/{p}", 999).unwrap();
    assert!(matches!(r.root.statics, Statics::Many(_)));
    for i in 0..50u32 {
        assert_eq!(get(&r, "GET", &format!("/s{i}")), Some((i, vec![])));
        assert_eq!(get(&r, "GET", &format!("/s{i}/x")), Some((100 + i, vec![])));
    }
    assert_eq!(get(&r, "GET", "/s50"), Some((999, vec!["s50"])));
    assert!(r.insert(Some("GET"), "/s3", 0).is_err());
}

#[test]
fn conflict_duplicate_method() {
    let e = err(Some("GET"), "/a/{x}", &[(Some("GET"), "/a/{x}")]);
    assert_eq!(e, "route `GET /a/{x}` is already defined");
    let e = err(None, "/a", &[(None, "/a"), (Some("GET"), "/a")]);
    assert_eq!(e, "route `ANY /a` is already defined");
    let e = err(Some("GET"), "/a/{r+}", &[(Some("GET"), "/a/{r+}")]);
    assert_eq!(e, "route `GET /a/{r+}` is already defined");
    // Different methods, ANY next to exact, and different shapes are fine.
    router(&[
        (Some("GET"), "/a/{x}", 1),
        (Some("POST"), "/a/{x}", 2),
        (None, "/a/{x}", 3),
        (Some("GET"), "/a/{x}/", 4),
        (Some("GET"), "/a/b", 5),
        (Some("GET"), "/a/{x+}", 6),
    ]);
}

#[test]
fn conflict_param_names() {
    let e = err(Some("GET"), "/a/{y}", &[(Some("GET"), "/a/{x}")]);
    assert_eq!(
        e,
        "route `GET /a/{y}` conflicts with `GET /a/{x}`: \
         parameters at the same position must have the same name"
    );
    // Also across methods and deeper patterns sharing the prefix.
    let e = err(Some("POST"), "/a/{y}/c", &[(None, "/a/{x}/b")]);
    assert!(
        e.starts_with("route `POST /a/{y}/c` conflicts with `ANY /a/{x}/b`"),
        "{e}"
    );
    // Different parents are independent.
    router(&[(Some("GET"), "/a/{x}", 1), (Some("GET"), "/b/{y}", 2)]);
}

#[test]
fn conflict_greedy_names() {
    let e = err(Some("POST"), "/a/{rest+}", &[(Some("GET"), "/a/{path+}")]);
    assert_eq!(
        e,
        "route `POST /a/{rest+}` conflicts with `GET /a/{path+}`: \
         greedy parameters at the same position must have the same name"
    );
    // A param and a greedy at the same position coexist, names independent.
    router(&[(Some("GET"), "/a/{x}", 1), (Some("GET"), "/a/{rest+}", 2)]);
}

#[test]
fn invalid_patterns() {
    let cases = [
        ("", "it is empty"),
        ("a/b", "must start with '/'"),
        ("/a{b}", "whole segment"),
        ("/{a}b", "whole segment"),
        ("/a}", "whole segment"),
        ("/{a", "whole segment"),
        ("/{a}}", "must be non-empty and match"),
        ("/{}", "must be non-empty and match"),
        ("/{+}", "must be non-empty and match"),
        ("/{a-b}", "must be non-empty and match"),
        ("/{a/b}", "whole segment"),
        ("/{a}/{a}", "appears more than once"),
        ("/{a}/{a+}", "appears more than once"),
        ("/{r+}/x", "must be the last segment"),
        ("/{r+}/", "must be the last segment"),
    ];
    for (pattern, why) in cases {
        let e = param_names(pattern).unwrap_err().to_string();
        assert!(e.contains(why), "{pattern:?}: {e}");
        assert!(!e.contains('\n'));
        assert_eq!(err(Some("GET"), pattern, &[]), e);
    }
    assert_eq!(
        param_names("/a{b}").unwrap_err().to_string(),
        "invalid route pattern `/a{b}`: a parameter must be a whole segment, `{name}` or `{name+}`"
    );
}

#[test]
fn invalid_methods() {
    for m in ["", "GE T", "GET\r", "G/T"] {
        let e = err(Some(m), "/a", &[]);
        assert!(e.contains("invalid method"), "{e}");
    }
}

#[test]
fn param_names_in_order() {
    assert_eq!(param_names("/a/{id}/{rest+}").unwrap(), ["id", "rest"]);
    assert_eq!(param_names("/").unwrap(), Vec::<String>::new());
    assert_eq!(param_names("/v1/{A_9}/x/{b}").unwrap(), ["A_9", "b"]);
}

#[test]
fn ten_thousand_routes() {
    let mut r = Router::new();
    let mut routes = Vec::new();
    for i in 0..2000u32 {
        let shapes = [
            (
                Some("GET"),
                format!("/v1/res{i}"),
                format!("/v1/res{i}"),
                vec![],
            ),
            (
                Some("GET"),
                format!("/v1/res{i}/{{id}}"),
                format!("/v1/res{i}/{i}x"),
                vec![format!("{i}x")],
            ),
            (
                None,
                format!("/v1/res{i}/{{id}}/orders/{{order}}"),
                format!("/v1/res{i}/u{i}/orders/o{i}"),
                vec![format!("u{i}"), format!("o{i}")],
            ),
            (
                Some("PUT"),
                format!("/v1/res{i}/stats/daily"),
                format!("/v1/res{i}/stats/daily"),
                vec![],
            ),
            (
                Some("GET"),
                format!("/v1/res{i}/files/{{path+}}"),
                format!("/v1/res{i}/files/a/{i}.txt"),
                vec![format!("a/{i}.txt")],
            ),
        ];
        for (m, pattern, path, caps) in shapes {
            let v = routes.len() as u32;
            r.insert(m, &pattern, v).unwrap();
            routes.push((m.unwrap_or("POST"), path, v, caps));
        }
    }
    assert_eq!(r.len(), 10_000);
    for (m, path, v, caps) in &routes {
        let got = get(&r, m, path).unwrap_or_else(|| panic!("{m} {path}"));
        assert_eq!(got.0, *v, "{m} {path}");
        assert_eq!(got.1, *caps, "{m} {path}");
    }
    assert_eq!(status(&r, "GET", "/v1/res2000"), Match::NotFound);
    assert_eq!(
        status(&r, "DELETE", "/v1/res7/stats/daily"),
        Match::MethodNotAllowed
    );
    assert_eq!(status(&r, "GET", "/v1/res7/1/nope"), Match::NotFound);
}

#[test]
fn clone_and_debug() {
    let r = router(&[(Some("GET"), "/a/{x}", 1)]);
    let c = r.clone();
    assert_eq!(get(&c, "GET", "/a/b"), Some((1, vec!["b"])));
    assert_eq!(format!("{r:?}"), "Router { len: 1, .. }");
}
