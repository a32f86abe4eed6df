/* Operator actions on the server-rendered pages (docs/accounts.md "Signing in on the web pages", docs/binding.md
 * "Approving in the web UI").
 *
 * Owns: the sign-in and change-password forms of /login, the signed-in operator in the page header, and the action
 * forms (approve / reject a binding application on /bindings, unbind on /devices/{id}, publish the drug-usage rules
 * on /catalogue). Every action is a call to the existing JSON API with `Authorization: Bearer <token>`; the server
 * decides (roles, 409, 422), this file only shows the outcome in Chinese with English beside it.
 *
 * The session token for actions lives in this tab's sessionStorage only (gone when the tab closes) and is sent as
 * `Authorization: Bearer`. The login response also sets the server's HttpOnly, SameSite=Strict page cookie, which
 * this script cannot read: it opens the read-only pages (and /auth/me, and signing out) but no action, so no other
 * site can make the browser act for the operator. Only login, logout and /auth/me send cookies (credentials
 * "same-origin"); every other call omits them. The token must never be written to localStorage, a cookie, the URL
 * or the console, and nothing is fetched from anywhere but this server. Text from the server is inserted with
 * textContent only.
 */
(function () {
  "use strict";

  var SESSION_KEY = "yibao.operator.session";
  var FLASH_KEY = "yibao.operator.flash";
  var RELOAD_MS = 900;

  var ROLE_WORDS = {
    device_admin: "设备管理员",
    institution_head: "机构负责人",
    pharmacist: "药师",
    cashier: "收银员",
    regulator: "监管人员",
    security_admin: "安全管理员",
    auditor: "审计员",
  };

  // ------------------------------------------------------------ session storage

  function loadSession() {
    var raw;
    try {
      raw = window.sessionStorage.getItem(SESSION_KEY);
    } catch (e) {
      return null;
    }
    if (!raw) return null;
    try {
      var session = JSON.parse(raw);
      // No expiry check against this computer's clock (it may be wrong): the server answers 401 for an ended
      // session and the token is dropped then.
      if (!session || typeof session.token !== "string") return null;
      return session;
    } catch (e) {
      clearSession();
      return null;
    }
  }

  function saveSession(login, username) {
    var session = { token: login.token, expires_at: login.expires_at, roles: login.roles, username: username };
    window.sessionStorage.setItem(SESSION_KEY, JSON.stringify(session));
    return session;
  }

  function clearSession() {
    try {
      window.sessionStorage.removeItem(SESSION_KEY);
    } catch (e) {
      /* storage disabled: nothing was kept */
    }
  }

  function setFlash(zh, en, kind) {
    try {
      window.sessionStorage.setItem(FLASH_KEY, JSON.stringify({ zh: zh, en: en, kind: kind }));
    } catch (e) {
      /* storage disabled: the message was shown before the reload, that is enough */
    }
  }

  function showFlash() {
    var el = document.getElementById("flash");
    try {
      var raw = window.sessionStorage.getItem(FLASH_KEY);
      if (!el || !raw) return;
      window.sessionStorage.removeItem(FLASH_KEY);
      var flash = JSON.parse(raw);
      say(el, String(flash.zh), String(flash.en), "", flash.kind === "ok" || flash.kind === "error" ? flash.kind : "info");
      el.hidden = false;
    } catch (e) {
      /* storage disabled or a malformed flash: nothing to show */
    }
  }

  // ------------------------------------------------------------ the API

  async function api(method, path, body, token, withCookie) {
    var headers = { Accept: "application/json" };
    var credentials = withCookie ? "same-origin" : "omit";
    var init = { method: method, headers: headers, credentials: credentials, cache: "no-store" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    if (token) headers.Authorization = "Bearer " + token;
    var resp;
    try {
      resp = await window.fetch(path, init);
    } catch (e) {
      return { status: 0, data: null };
    }
    var data = null;
    if (resp.status !== 204) {
      try {
        data = await resp.json();
      } catch (e) {
        data = null;
      }
    }
    return { status: resp.status, data: data };
  }

  /** The server's words: a string `detail`, or FastAPI's list of validation errors. */
  function detailOf(data) {
    if (!data) return "";
    var detail = data.detail;
    if (typeof detail === "string") return detail;
    if (Array.isArray(detail)) {
      return detail
        .map(function (item) {
          var where = Array.isArray(item.loc) ? item.loc.slice(1).join(".") : "";
          return (where ? where + ": " : "") + (item.msg || "");
        })
        .join("; ");
    }
    return "";
  }

  /** Chinese first, English beside it, for a refused call. */
  function refusalWords(status) {
    switch (status) {
      case 0:
        return ["网络错误，请检查连接后重试", "Network error; check the connection and try again"];
      case 401:
        return ["未登录或登录已失效，请重新登录", "Not signed in or the session has ended; sign in again"];
      case 403:
        return ["无权限：此操作需要设备管理员角色", "Forbidden: this needs the device_admin role"];
      case 404:
        return ["未找到该记录", "Not found"];
      case 409:
        return ["无法执行：该申请已处理或当前状态不允许", "Conflict: already decided, or not allowed in this state"];
      case 422:
        return ["请求被拒绝，请检查填写内容", "Refused: check what was entered"];
      case 423:
        return ["账户已锁定，请稍后再试", "The account is locked; try again later"];
      case 503:
        return ["服务器数据库暂不可用，请稍后重试", "The server's database is unavailable; try again shortly"];
      default:
        return ["操作失败（HTTP " + status + "）", "Failed (HTTP " + status + ")"];
    }
  }

  /** Put `zh` and `<small lang=en>en: detail</small>` into `el`, as text. */
  function say(el, zh, en, detail, kind) {
    el.textContent = "";
    el.appendChild(document.createTextNode(zh + " "));
    var small = document.createElement("small");
    small.lang = "en";
    small.textContent = en + (detail ? " — " + detail : "");
    el.appendChild(small);
    el.classList.remove("ok", "error", "info");
    el.classList.add(kind || "info");
  }

  function sayRefusal(el, result) {
    var words = refusalWords(result.status);
    say(el, words[0], words[1], detailOf(result.data), "error");
    if (result.status === 401) {
      clearSession();
      renderOperator(null, null);
    }
  }

  function hasRole(session, role) {
    return !!session && Array.isArray(session.roles) && session.roles.indexOf(role) >= 0;
  }

  function roleList(roles) {
    return (roles || [])
      .map(function (r) {
        return (ROLE_WORDS[r] || r) + " " + r;
      })
      .join(", ");
  }

  function here() {
    return window.location.pathname + window.location.search;
  }

  /** Only a path on this server (never `//elsewhere` or a scheme) may be the place to go after signing in. */
  function safeNext() {
    var next = new URLSearchParams(window.location.search).get("next");
    if (next && next.charAt(0) === "/" && next.charAt(1) !== "/" && next.charAt(1) !== "\\") return next;
    return "/";
  }

  // ------------------------------------------------------------ the header

  function renderOperator(session, me) {
    var signIn = document.getElementById("sign-in-link");
    var name = document.getElementById("operator-name");
    var roles = document.getElementById("operator-roles");
    var logout = document.getElementById("logout");
    if (!signIn || !name || !roles || !logout) return;
    if (!session) {
      signIn.hidden = false;
      if (window.location.pathname !== "/login") signIn.href = "/login?next=" + encodeURIComponent(here());
      name.hidden = roles.hidden = logout.hidden = true;
      return;
    }
    signIn.hidden = true;
    var username = (me && me.username) || session.username || "";
    name.textContent = me && me.name ? me.name + "（" + username + "）" : username;
    roles.textContent = roleList((me && me.roles) || session.roles);
    name.hidden = roles.hidden = logout.hidden = false;
  }

  async function signOut() {
    var session = loadSession();
    clearSession();
    // The page cookie too: a tab that holds no token (opened after signing in elsewhere) signs out with it.
    await api("POST", "/api/v1/auth/logout", undefined, session ? session.token : undefined, true);
    setFlash("已退出登录", "Signed out", "info");
    window.location.reload();
  }

  // ------------------------------------------------------------ action forms

  function enableActions(session) {
    var allowed = hasRole(session, "device_admin");
    document.querySelectorAll("form[data-action]").forEach(function (form) {
      form.querySelectorAll("input, button").forEach(function (control) {
        control.disabled = !allowed;
      });
    });
    var rulesForm = document.querySelector("form[data-rules-form]");
    if (rulesForm) {
      rulesForm.querySelectorAll("textarea, button").forEach(function (control) {
        control.disabled = !hasRole(session, "regulator");
      });
    }
    document.querySelectorAll("[data-needs-role]").forEach(function (note) {
      if (!session) return; // the server-rendered "sign in first" stays
      var role = note.dataset.needsRole;
      if (hasRole(session, role)) {
        note.hidden = true;
        return;
      }
      say(
        note,
        "当前账号（" + roleList(session.roles) + "）没有" + ROLE_WORDS[role] + "权限，按钮不可用",
        "Your account has no " + role + " role; the buttons are disabled",
        "",
        "info"
      );
    });
  }

  // ------------------------------------------------------------ /catalogue: publishing the drug-usage rules

  function publishedWords(data) {
    if (!data.created) {
      return ["与当前版本相同，未发布新版本", "Same as the current version; nothing published"];
    }
    return [
      "已发布第 " + data.version + " 版（" + data.count + " 条规则），已通知 " + data.notified + " 台终端",
      "Version " + data.version + " published (" + data.count + " rules); " + data.notified + " terminal(s) notified",
    ];
  }

  async function publishRules(form) {
    var message = document.getElementById("rules-message");
    var field = document.getElementById("rules-json");
    var parsed;
    try {
      parsed = JSON.parse(field.value);
    } catch (e) {
      say(message, "JSON 格式错误，未发布", "Not valid JSON; nothing published", String(e.message || e), "error");
      field.setAttribute("aria-invalid", "true");
      field.focus();
      return;
    }
    var rules = Array.isArray(parsed) ? parsed : parsed && parsed.rules;
    if (!Array.isArray(rules)) {
      say(message, "须为 {\"rules\": [...]}，未发布", 'Expected {"rules": [...]}; nothing published', "", "error");
      field.setAttribute("aria-invalid", "true");
      return;
    }
    field.removeAttribute("aria-invalid");
    var session = loadSession();
    if (!session) {
      sayRefusal(message, { status: 401, data: null });
      return;
    }
    var controls = form.querySelectorAll("textarea, button");
    controls.forEach(function (c) {
      c.disabled = true;
    });
    say(message, "正在发布……", "Publishing…", "", "info");
    var body = { rules: rules, base_version: Number(form.dataset.baseVersion) };
    var result = await api("PUT", "/api/v1/drug-rules", body, session.token);
    if (result.status === 201 || result.status === 200) {
      var words = publishedWords(result.data);
      say(message, words[0], words[1], "", "ok");
      setFlash(words[0], words[1], "ok");
      window.setTimeout(function () {
        window.location.reload();
      }, RELOAD_MS);
      return;
    }
    if (result.status === 422) {
      say(message, "规则未通过校验，未发布", "The rules were refused; nothing published", detailOf(result.data), "error");
    } else {
      sayRefusal(message, result);
    }
    controls.forEach(function (c) {
      c.disabled = !hasRole(loadSession(), "regulator");
    });
    if (result.status === 401) {
      window.setTimeout(function () {
        window.location.assign("/login?next=" + encodeURIComponent(here()));
      }, RELOAD_MS * 3);
    }
  }

  function wireRules() {
    var form = document.querySelector("form[data-rules-form]");
    if (!form) return;
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      publishRules(form);
    });
  }

  function actionRequest(form, verdict) {
    if (form.dataset.action === "unbind") {
      return {
        path: "/api/v1/devices/" + encodeURIComponent(form.dataset.deviceId) + "/unbind",
        done: ["已解除绑定，解绑指令已下发给终端", "Unbound; the unbind command is queued for the terminal"],
      };
    }
    var id = form.dataset.applicationId;
    var path = "/api/v1/binding-applications/" + encodeURIComponent(id) + "/" + verdict;
    if (verdict === "approve") {
      return {
        path: path,
        done: ["已批准申请 " + id + "，绑定结果已下发给终端", "Application " + id + " approved; the terminal will be told"],
      };
    }
    return {
      path: path,
      done: ["已驳回申请 " + id + "，驳回理由已下发给终端", "Application " + id + " rejected; the terminal will be told why"],
    };
  }

  async function submitAction(form, submitter) {
    var message = form.querySelector(".message");
    var reasonField = form.querySelector("input[name=reason]");
    var verdict = submitter && submitter.value;
    if (!verdict) {
      // Enter in the reason field: a decision is never taken by default
      say(message, "请点击“批准”或“驳回”按钮", "Choose Approve or Reject", "", "info");
      return;
    }
    var reason = reasonField.value.trim();
    if (!reason) {
      say(message, "请填写理由（必填）", "A reason is required", "", "error");
      reasonField.setAttribute("aria-invalid", "true");
      reasonField.focus();
      return;
    }
    reasonField.removeAttribute("aria-invalid");
    var session = loadSession();
    if (!session) {
      sayRefusal(message, { status: 401, data: null });
      return;
    }
    var request = actionRequest(form, verdict);
    var controls = form.querySelectorAll("input, button");
    controls.forEach(function (c) {
      c.disabled = true;
    });
    say(message, "正在提交……", "Sending…", "", "info");
    var body = { reason: reason };
    var contactField = form.querySelector("input[name=contact]");
    if (contactField && contactField.value.trim()) body.contact = contactField.value.trim();
    var result = await api("POST", request.path, body, session.token);
    if (result.status === 200) {
      say(message, request.done[0], request.done[1], "", "ok");
      setFlash(request.done[0], request.done[1], "ok");
      window.setTimeout(function () {
        window.location.reload();
      }, RELOAD_MS);
      return;
    }
    sayRefusal(message, result);
    if (result.status === 401) {
      // the session ended (idle, expired, signed out elsewhere): sign in again and come back here
      window.setTimeout(function () {
        window.location.assign("/login?next=" + encodeURIComponent(here()));
      }, RELOAD_MS * 3);
      return;
    }
    var still = loadSession();
    controls.forEach(function (c) {
      c.disabled = !hasRole(still, "device_admin");
    });
    if (result.status === 409 || result.status === 404) {
      // someone else decided meanwhile: show the current state after the message has been read
      setFlash(refusalWords(result.status)[0], refusalWords(result.status)[1] + " — " + detailOf(result.data), "error");
      window.setTimeout(function () {
        window.location.reload();
      }, RELOAD_MS * 3);
    }
  }

  function wireActions() {
    document.querySelectorAll("form[data-action]").forEach(function (form) {
      form.addEventListener("submit", function (event) {
        event.preventDefault();
        submitAction(form, event.submitter);
      });
      if (form.dataset.action === "decide") {
        form.querySelectorAll("input[type=text]").forEach(function (field) {
          field.addEventListener("keydown", function (event) {
            if (event.key === "Enter") {
              event.preventDefault();
              submitAction(form, null);
            }
          });
        });
      }
    });
  }

  // ------------------------------------------------------------ /login

  function wireLogin() {
    var loginForm = document.getElementById("login-form");
    var passwordForm = document.getElementById("password-form");
    if (!loginForm || !passwordForm) return;
    var loginMessage = document.getElementById("login-message");
    var passwordMessage = document.getElementById("password-message");
    var pending = null; // a login whose password must be changed first: kept in memory only

    function done(zh, en) {
      setFlash(zh, en, "ok");
      window.location.assign(safeNext());
    }

    loginForm.addEventListener("submit", async function (event) {
      event.preventDefault();
      var username = loginForm.elements.username.value.trim();
      var password = loginForm.elements.password.value;
      if (!username || !password) {
        say(loginMessage, "请输入用户名和密码", "Enter the username and the password", "", "error");
        (username ? loginForm.elements.password : loginForm.elements.username).focus();
        return;
      }
      var button = document.getElementById("login-submit");
      button.disabled = true;
      say(loginMessage, "正在登录……", "Signing in…", "", "info");
      var result = await api("POST", "/api/v1/auth/login", { username: username, password: password }, undefined, true);
      button.disabled = false;
      loginForm.elements.password.value = "";
      if (result.status === 200 && result.data && result.data.token) {
        if (result.data.must_change_password) {
          pending = { login: result.data, username: username };
          loginForm.hidden = true;
          passwordForm.hidden = false;
          say(passwordMessage, "请先修改密码", "Change the password to continue", "", "info");
          passwordForm.elements.old_password.focus();
          return;
        }
        saveSession(result.data, username);
        done("登录成功", "Signed in as " + username);
        return;
      }
      if (result.status === 401) {
        say(
          loginMessage,
          "用户名或密码错误（连续失败多次将锁定账户）",
          "Wrong username or password (repeated failures lock the account)",
          "",
          "error"
        );
      } else {
        var words = refusalWords(result.status);
        say(loginMessage, words[0], words[1], detailOf(result.data), "error");
      }
      loginForm.elements.password.focus();
    });

    passwordForm.addEventListener("submit", async function (event) {
      event.preventDefault();
      var oldPassword = passwordForm.elements.old_password.value;
      var newPassword = passwordForm.elements.new_password.value;
      var confirmPassword = passwordForm.elements.confirm_password.value;
      if (!pending) return;
      if (!oldPassword || !newPassword) {
        say(passwordMessage, "请填写当前密码和新密码", "Enter the current and the new password", "", "error");
        return;
      }
      if (newPassword !== confirmPassword) {
        say(passwordMessage, "两次输入的新密码不一致", "The two new passwords differ", "", "error");
        passwordForm.elements.confirm_password.focus();
        return;
      }
      var button = document.getElementById("password-submit");
      button.disabled = true;
      var result = await api(
        "POST",
        "/api/v1/auth/password",
        { old_password: oldPassword, new_password: newPassword },
        pending.login.token
      );
      button.disabled = false;
      if (result.status === 204) {
        saveSession(pending.login, pending.username);
        pending = null;
        done("密码已修改，已登录", "Password changed; signed in");
        return;
      }
      if (result.status === 401) {
        pending = null;
        passwordForm.hidden = true;
        loginForm.hidden = false;
        sayRefusal(loginMessage, result);
        return;
      }
      if (result.status === 422) {
        say(passwordMessage, "新密码未被接受", "The password was refused", detailOf(result.data), "error");
      } else {
        var words = refusalWords(result.status);
        say(passwordMessage, words[0], words[1], detailOf(result.data), "error");
      }
    });
  }

  // ------------------------------------------------------------ start

  async function start() {
    showFlash();
    wireLogin();
    wireActions();
    wireRules();
    var logout = document.getElementById("logout");
    if (logout) logout.addEventListener("click", signOut);
    var session = loadSession();
    renderOperator(session, null);
    enableActions(session);
    if (!session) {
      // Signed in in another tab: the page cookie says who, but this tab holds no token, so actions stay off.
      var viewer = await api("GET", "/api/v1/auth/me", undefined, undefined, true);
      if (viewer.status === 200 && viewer.data && window.location.pathname !== "/login") {
        renderOperator({ username: viewer.data.username, roles: viewer.data.roles }, viewer.data);
      }
      return;
    }
    var me = await api("GET", "/api/v1/auth/me", undefined, session.token);
    if (me.status === 200 && me.data) {
      session.roles = me.data.roles; // the server's word, not what was stored at login
      window.sessionStorage.setItem(SESSION_KEY, JSON.stringify(session));
      renderOperator(session, me.data);
      enableActions(session);
    } else if (me.status === 401) {
      clearSession();
      renderOperator(null, null);
      enableActions(null);
    }
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
