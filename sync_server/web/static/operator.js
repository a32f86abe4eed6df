/* Operator actions on the server-rendered pages (docs/accounts.md "Signing in on the web pages", docs/binding.md
 * "Approving in the web UI").
 *
 * Owns: the sign-in and change-password forms of /login, the signed-in operator in the page header, and the action
 * forms (approve / reject a binding application on /bindings, unbind on /devices/{id}, publish the drug-usage rules
 * and the next version of a catalogue from a JSON or CSV file on /catalogue). Every action is a call to the existing
 * JSON API with `Authorization: Bearer <token>`; the server decides (roles, 409, 422), this file only shows the
 * outcome in Chinese with English beside it.
 *
 * The session token for actions lives in this tab's sessionStorage only (gone when the tab closes) and is sent as
 * `Authorization: Bearer`. The login response also sets the server's HttpOnly, SameSite=Strict page cookie, which
 * this script cannot read: it opens the read-only pages (and /auth/me, and signing out) but no action, so no other
 * site can make the browser act for the operator. Only login, logout and /auth/me send cookies (credentials
 * "same-origin"); every other call omits them. The token must never be written to localStorage, a cookie, the URL
 * or the console, and nothing is fetched from anywhere but this server. Text from the server is inserted with
 * textContent only. A catalogue file is read and checked in the page and sent, as JSON, to
 * `POST /api/v1/catalogues/{kind}/versions` only; messages about it name lines, entries and columns, never the
 * content of a cell.
 */
(function () {
  "use strict";

  var SESSION_KEY = "yibao.operator.session";
  var FLASH_KEY = "yibao.operator.flash";
  var RELOAD_MS = 900;
  var PUBLISHERS = ["regulator", "device_admin"]; // who may publish a catalogue (sync_server/authz.py)
  var MAX_CATALOGUE_ENTRIES = 200000; // CataloguePublishIn.entries
  var MAX_PROBLEMS_SHOWN = 10;

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
      init.body = typeof body === "string" ? body : JSON.stringify(body); // a string is JSON already
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

  /** Chinese first, English beside it, for a refused call; `forbidden` replaces the words for 403. */
  function refusalWords(status, forbidden) {
    if (status === 403 && forbidden) return forbidden;
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

  function sayRefusal(el, result, forbidden) {
    var words = refusalWords(result.status, forbidden);
    say(el, words[0], words[1], detailOf(result.data), "error");
    if (result.status === 401) {
      clearSession();
      renderOperator(null, null);
    }
  }

  function hasRole(session, role) {
    return !!session && Array.isArray(session.roles) && session.roles.indexOf(role) >= 0;
  }

  function hasAnyRole(session, roles) {
    return roles.some(function (role) {
      return hasRole(session, role);
    });
  }

  // ------------------------------------------------------------ after a form's request (every action form)

  function doneThenReload(message, words) {
    say(message, words[0], words[1], "", "ok");
    setFlash(words[0], words[1], "ok");
    window.setTimeout(function () {
      window.location.reload();
    }, RELOAD_MS);
  }

  function signInAgainSoon() {
    // the session ended (idle, expired, signed out elsewhere): sign in again and come back here
    window.setTimeout(function () {
      window.location.assign("/login?next=" + encodeURIComponent(here()));
    }, RELOAD_MS * 3);
  }

  function enableFor(controls, roles) {
    var still = loadSession();
    controls.forEach(function (c) {
      c.disabled = !hasAnyRole(still, roles);
    });
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
    var catalogueForm = document.querySelector("form[data-catalogue-form]");
    if (catalogueForm) {
      catalogueForm.querySelectorAll("select, input, button").forEach(function (control) {
        control.disabled = !hasAnyRole(session, PUBLISHERS);
      });
    }
    document.querySelectorAll("[data-needs-role]").forEach(function (note) {
      if (!session) return; // the server-rendered "sign in first" stays
      var roles = note.dataset.needsRole.split(" "); // any one of them will do
      if (hasAnyRole(session, roles)) {
        note.hidden = true;
        return;
      }
      say(
        note,
        "当前账号（" +
          roleList(session.roles) +
          "）没有" +
          roles
            .map(function (role) {
              return ROLE_WORDS[role];
            })
            .join("或") +
          "权限，按钮不可用",
        "Your account has no " + roles.join(" or ") + " role; the buttons are disabled",
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
      doneThenReload(message, publishedWords(result.data));
      return;
    }
    if (result.status === 422) {
      say(message, "规则未通过校验，未发布", "The rules were refused; nothing published", detailOf(result.data), "error");
    } else {
      sayRefusal(message, result, [
        "无权限：发布用药规则需要监管人员角色",
        "Forbidden: publishing the rules needs the regulator role",
      ]);
    }
    enableFor(controls, ["regulator"]);
    if (result.status === 401) signInAgainSoon();
  }

  function wireRules() {
    var form = document.querySelector("form[data-rules-form]");
    if (!form) return;
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      publishRules(form);
    });
  }

  // ------------------------------------------------------------ /catalogue: publishing a catalogue from a file

  /** Why a file cannot be published, found in the page before anything is sent (lines and columns, never cells). */
  function FileProblem(zh, en) {
    this.zh = zh;
    this.en = en;
  }

  /** Line breaks (CRLF, LF or a lone CR) in text[from, to). */
  function breaksIn(text, from, to) {
    var count = 0;
    for (var k = from; k < to; k++) {
      var c = text.charCodeAt(k);
      if (c === 10 || (c === 13 && text.charCodeAt(k + 1) !== 10)) count++;
    }
    return count;
  }

  /**
   * CSV as RFC 4180 writes it: cells separated by commas, records by CRLF, LF or CR; a cell in double quotes may
   * hold commas, line breaks and quotes written twice (""). Returns {records, lines}, lines[i] being the line of the
   * file record i starts on; blank lines are skipped. A quote inside an unquoted cell, anything but a comma or a line
   * break after a closing quote, and a quote never closed are refused with their line: guessing would shift every
   * cell after it.
   */
  function parseCsv(text) {
    var records = [];
    var lines = [];
    var n = text.length;
    var i = 0;
    var line = 1;
    var recordLine = 1;
    var row = [];
    var special = /[,\r\n"]/g; // what ends an unquoted cell (a quote: refused)
    for (;;) {
      var cell;
      var quoted = i < n && text.charCodeAt(i) === 34;
      if (quoted) {
        var opened = line;
        var pieces = [];
        i++;
        for (;;) {
          var q = text.indexOf('"', i);
          if (q < 0) {
            throw new FileProblem(
              "第 " + opened + " 行开始的引号没有闭合",
              "The quote opened on line " + opened + " is never closed"
            );
          }
          pieces.push(text.slice(i, q));
          line += breaksIn(text, i, q);
          if (text.charCodeAt(q + 1) === 34) {
            pieces.push('"');
            i = q + 2;
            continue;
          }
          i = q + 1;
          break;
        }
        cell = pieces.join("");
        var after = i < n ? text.charCodeAt(i) : 44;
        if (after !== 44 && after !== 10 && after !== 13) {
          throw new FileProblem(
            "第 " + line + " 行：右引号后须为逗号或换行",
            "Line " + line + ": a closing quote must be followed by a comma or a line break"
          );
        }
      } else {
        special.lastIndex = i;
        var found = special.exec(text);
        var j = found ? found.index : n;
        if (found && found[0] === '"') {
          throw new FileProblem(
            "第 " + line + " 行：未加引号的单元格中有引号（请把整个单元格放进引号，其中的引号写两遍）",
            "Line " + line + ": a quote inside an unquoted cell (quote the whole cell and write the quote twice)"
          );
        }
        cell = text.slice(i, j);
        i = j;
      }
      row.push(cell);
      if (i < n && text.charCodeAt(i) === 44) {
        i++;
        continue; // the next cell of this record (a comma at the very end is one more empty cell)
      }
      if (!(row.length === 1 && row[0] === "" && !quoted)) {
        records.push(row);
        lines.push(recordLine);
      }
      if (i >= n) break;
      i += text.charCodeAt(i) === 13 && text.charCodeAt(i + 1) === 10 ? 2 : 1;
      line++;
      recordLine = line;
      row = [];
      if (i >= n) break; // a line break at the end closes the last record, it opens none
    }
    return { records: records, lines: lines };
  }

  var TRUE_WORDS = ["true", "1", "yes", "y", "是"];
  var FALSE_WORDS = ["false", "0", "no", "n", "否"];

  /** A cell as the JSON value its column takes; what cannot be one is sent as written and the server names it. */
  function cellValue(column, cell) {
    if (column.type === "text") return cell;
    var value = cell.trim();
    if (column.type === "int" && /^[0-9]{1,15}$/.test(value)) return Number(value);
    if (column.type === "bool") {
      if (TRUE_WORDS.indexOf(value.toLowerCase()) >= 0) return true;
      if (FALSE_WORDS.indexOf(value.toLowerCase()) >= 0) return false;
    }
    return value;
  }

  /** The entries of a CSV file: the first record names the columns (`columns` of the chosen kind). */
  function csvEntries(text, kind, columns) {
    var parsed = parseCsv(text);
    if (!parsed.records.length) throw new FileProblem("文件是空的", "The file is empty");
    var header = parsed.records[0].map(function (name) {
      return name.trim();
    });
    var byName = {};
    columns.forEach(function (column) {
      byName[column.name] = column;
    });
    var seen = {};
    header.forEach(function (name, index) {
      if (!name) {
        throw new FileProblem("表头第 " + (index + 1) + " 列没有列名", "Column " + (index + 1) + " of the header has no name");
      }
      if (seen[name]) throw new FileProblem("表头中列 " + name + " 出现了两次", "Column " + name + " appears twice");
      if (name !== "kind" && !byName[name]) {
        throw new FileProblem(
          "表头中有此目录没有的列：" + name + "（列见“各目录的 CSV 列”）",
          "The header names a column this catalogue does not have: " + name
        );
      }
      seen[name] = true;
    });
    var missing = columns
      .filter(function (column) {
        return column.required && !seen[column.name];
      })
      .map(function (column) {
        return column.name;
      });
    if (missing.length) {
      throw new FileProblem("缺少必填列：" + missing.join(", "), "Required column(s) missing: " + missing.join(", "));
    }
    var entries = [];
    var lines = [];
    for (var r = 1; r < parsed.records.length; r++) {
      var cells = parsed.records[r];
      if (cells.length !== header.length) {
        throw new FileProblem(
          "第 " + parsed.lines[r] + " 行有 " + cells.length + " 个单元格，表头有 " + header.length + " 列",
          "Line " + parsed.lines[r] + " has " + cells.length + " cells; the header has " + header.length + " columns"
        );
      }
      var entry = { kind: kind };
      for (var k = 0; k < header.length; k++) {
        var name = header[k];
        var cell = cells[k];
        if (name === "kind") {
          if (cell.trim()) entry.kind = cell.trim();
        } else if (cell.trim() === "") {
          if (byName[name].blank) entry[name] = ""; // required, and may be empty: said as ""
        } else {
          entry[name] = cellValue(byName[name], cell);
        }
      }
      entries.push(entry);
      lines.push(parsed.lines[r]);
    }
    return {
      format: "CSV",
      entries: entries,
      where: function (index) {
        var at = lines[index];
        return at === undefined ? null : ["第 " + at + " 行", "line " + at];
      },
    };
  }

  /** The entries of a JSON file: {"entries": [...]} (a catalogue snapshot document too) or a bare list. */
  function jsonEntries(text, kind) {
    var parsed;
    try {
      parsed = JSON.parse(text);
    } catch (e) {
      // the parser's own message quotes the file, so it is not shown
      throw new FileProblem("不是有效的 JSON 文件", "Not a valid JSON file");
    }
    var list = Array.isArray(parsed) ? parsed : parsed && typeof parsed === "object" ? parsed.entries : undefined;
    if (!Array.isArray(list)) {
      throw new FileProblem(
        'JSON 须为 {"entries": [...]} 或条目数组',
        'The JSON must be {"entries": [...]} or a list of entries'
      );
    }
    if (!Array.isArray(parsed) && typeof parsed.kind === "string" && parsed.kind !== kind) {
      throw new FileProblem(
        "文件是 " + parsed.kind + " 目录，与所选目录 " + kind + " 不符",
        "The file is a " + parsed.kind + " catalogue, not " + kind
      );
    }
    var entries = list.map(function (entry) {
      if (entry && typeof entry === "object" && !Array.isArray(entry) && entry.kind === undefined) {
        return Object.assign({ kind: kind }, entry);
      }
      return entry;
    });
    return {
      format: "JSON",
      entries: entries,
      where: function (index) {
        return index < entries.length ? ["第 " + (index + 1) + " 条", "entry " + (index + 1)] : null;
      },
    };
  }

  /** Read the chosen file for the chosen kind: {kind, format, entries, where(index)} or a FileProblem. */
  async function readCatalogueFile(file, option) {
    var kind = option.value;
    var text;
    try {
      text = new TextDecoder("utf-8", { fatal: true }).decode(await file.arrayBuffer());
    } catch (e) {
      throw new FileProblem(
        "文件不是 UTF-8 编码（Excel 中请另存为“CSV UTF-8（逗号分隔）”）",
        'The file is not UTF-8 (in Excel, save it as "CSV UTF-8 (Comma delimited)")'
      );
    }
    if (text.charCodeAt(0) === 0xfeff) text = text.slice(1); // the byte order mark Excel writes
    var json = /\.json$/i.test(file.name) || (!/\.csv$/i.test(file.name) && /^\s*[[{]/.test(text));
    var read = json ? jsonEntries(text, kind) : csvEntries(text, kind, JSON.parse(option.dataset.columns));
    if (!read.entries.length) {
      throw new FileProblem(
        "文件中没有条目（网页上不能发布空目录）",
        "The file holds no entries (an empty catalogue cannot be published here)"
      );
    }
    if (read.entries.length > MAX_CATALOGUE_ENTRIES) {
      throw new FileProblem(
        "条目过多：" + read.entries.length + " 条，上限 " + MAX_CATALOGUE_ENTRIES + " 条",
        "Too many entries: " + read.entries.length + ", at most " + MAX_CATALOGUE_ENTRIES
      );
    }
    read.kind = kind;
    return read;
  }

  function kindOption(form, kind) {
    var select = form.elements.kind;
    for (var k = 0; k < select.options.length; k++) {
      if (select.options[k].value === kind) return select.options[k];
    }
    return select.options[select.selectedIndex];
  }

  function catalogueName(option) {
    return [option.dataset.zh, option.dataset.en + " catalogue"];
  }

  function catalogueNextWords(option, read) {
    var name = catalogueName(option);
    var next = Number(option.dataset.version) + 1;
    return [
      "已读取 " + read.entries.length + " 条（" + read.format + "），将作为" + name[0] + "第 " + next + " 版发布",
      read.entries.length + " entries read (" + read.format + "); they will be version " + next + " of the " + name[1],
    ];
  }

  function cataloguePublishedWords(option, data) {
    var name = catalogueName(option);
    return [
      "已发布" +
        name[0] +
        "第 " +
        data.version +
        " 版（" +
        data.count +
        " 条；新增或修改 " +
        data.upserts +
        " 条，删除 " +
        data.deletions +
        " 条），已通知 " +
        data.notified +
        " 台终端",
      "Version " +
        data.version +
        " of the " +
        name[1] +
        " published (" +
        data.count +
        " entries; " +
        data.upserts +
        " upserts, " +
        data.deletions +
        " deletions); " +
        data.notified +
        " terminal(s) notified",
    ];
  }

  /** The server's refusal (422) as a list: where in the file (line or entry), which field, why; never the value. */
  function catalogueProblems(form, data, read) {
    var detail = data && data.detail;
    if (typeof detail === "string") return [detail];
    if (!Array.isArray(detail)) return [];
    var kinds = Array.prototype.map.call(form.elements.kind.options, function (option) {
      return option.value;
    });
    return detail.map(function (item) {
      var loc = Array.isArray(item.loc) ? item.loc.slice(1) : []; // "body" first
      var where = null;
      if (loc[0] === "entries" && typeof loc[1] === "number") {
        where = read.where(loc[1]);
        loc = loc.slice(2);
        if (loc.length > 1 && kinds.indexOf(loc[0]) >= 0) loc = loc.slice(1); // the tag of the entry's kind
      }
      var field = loc.join(".");
      return (
        (where ? where[0] + "（" + where[1] + "）" : "") +
        (field ? (where ? " " : "") + field : "") +
        (where || field ? "：" : "") +
        String(item.msg || "")
      );
    });
  }

  function sayProblems(el, zh, en, problems) {
    say(el, zh + (problems.length ? "（共 " + problems.length + " 处）" : ""), en, "", "error");
    if (!problems.length) return;
    var list = document.createElement("ul");
    list.className = "problems";
    problems.slice(0, MAX_PROBLEMS_SHOWN).forEach(function (text) {
      var item = document.createElement("li");
      item.textContent = text;
      list.appendChild(item);
    });
    if (problems.length > MAX_PROBLEMS_SHOWN) {
      var more = document.createElement("li");
      var left = problems.length - MAX_PROBLEMS_SHOWN;
      more.textContent = "……另有 " + left + " 处 / " + left + " more";
      list.appendChild(more);
    }
    el.appendChild(list);
  }

  var CATALOGUE_FORBIDDEN = [
    "无权限：发布目录需要监管人员或设备管理员角色",
    "Forbidden: publishing a catalogue needs the regulator or device_admin role",
  ];

  async function publishCatalogue(form, reading) {
    var message = document.getElementById("catalogue-message");
    var fileField = form.elements.file;
    if (!reading) {
      say(message, "请选择要发布的目录文件", "Choose the catalogue file to publish", "", "error");
      fileField.setAttribute("aria-invalid", "true");
      fileField.focus();
      return;
    }
    var read;
    try {
      read = await reading;
    } catch (problem) {
      var words = problem instanceof FileProblem ? [problem.zh, problem.en] : ["无法读取文件", "The file cannot be read"];
      say(message, words[0] + "，未发布", words[1] + "; nothing published", "", "error");
      fileField.focus();
      return;
    }
    var session = loadSession();
    if (!session) {
      sayRefusal(message, { status: 401, data: null });
      return;
    }
    var option = kindOption(form, read.kind);
    var body = JSON.stringify({ entries: read.entries, base_version: Number(option.dataset.version) });
    var maxBytes = Number(form.dataset.maxBytes);
    if (new Blob([body]).size > maxBytes) {
      var mib = Math.floor(maxBytes / 1048576);
      say(
        message,
        "文件过大：发送的内容超过服务器上限 " + mib + " MiB，未发布",
        "Too large: the request would exceed the server's limit of " + mib + " MiB; nothing published",
        "",
        "error"
      );
      return;
    }
    var controls = form.querySelectorAll("select, input, button");
    controls.forEach(function (c) {
      c.disabled = true;
    });
    form.setAttribute("aria-busy", "true");
    say(message, "正在发布 " + read.entries.length + " 条……", "Publishing " + read.entries.length + " entries…", "", "info");
    var path = "/api/v1/catalogues/" + encodeURIComponent(read.kind) + "/versions";
    var result = await api("POST", path, body, session.token);
    form.removeAttribute("aria-busy");
    if (result.status === 201 && result.data) {
      doneThenReload(message, cataloguePublishedWords(option, result.data));
      return;
    }
    if (result.status === 200 && result.data) {
      say(
        message,
        "与当前第 " + result.data.version + " 版完全相同，未发布新版本",
        "Identical to the current version " + result.data.version + "; nothing published",
        "",
        "info"
      );
    } else if (result.status === 422) {
      sayProblems(
        message,
        "目录未通过校验，未发布",
        "The catalogue was refused; nothing published",
        catalogueProblems(form, result.data, read)
      );
      fileField.setAttribute("aria-invalid", "true");
    } else if (result.status === 409) {
      say(
        message,
        "此页面打开后已有人发布了新版本，未发布。请刷新页面，核对后再发布",
        "Another version was published since this page was loaded; nothing published. " +
          "Reload the page, check, and publish again",
        detailOf(result.data),
        "error"
      );
      var reload = document.createElement("a");
      reload.href = here();
      reload.textContent = "刷新页面 / Reload";
      message.appendChild(document.createTextNode(" "));
      message.appendChild(reload);
    } else if (result.status === 413) {
      say(message, "文件过大，服务器拒收，未发布", "Too large for the server; nothing published", "", "error");
    } else {
      sayRefusal(message, result, CATALOGUE_FORBIDDEN);
    }
    enableFor(controls, PUBLISHERS);
    if (result.status === 401) signInAgainSoon();
  }

  function wireCatalogue() {
    var form = document.querySelector("form[data-catalogue-form]");
    if (!form) return;
    var select = form.elements.kind;
    var fileField = form.elements.file;
    var status = document.getElementById("catalogue-read");
    var message = document.getElementById("catalogue-message");
    var reading = null; // the read of the chosen file for the chosen kind (a promise)

    function prepare() {
      message.textContent = "";
      message.classList.remove("ok", "error", "info");
      var file = fileField.files && fileField.files[0];
      if (!file) {
        reading = null;
        status.textContent = "";
        status.classList.remove("ok", "error", "info");
        return;
      }
      var option = select.options[select.selectedIndex];
      say(status, "正在读取文件……", "Reading the file…", "", "info");
      var current = readCatalogueFile(file, option);
      reading = current;
      current.then(
        function (read) {
          if (reading !== current) return;
          fileField.removeAttribute("aria-invalid");
          var words = catalogueNextWords(option, read);
          say(status, words[0], words[1], "", "ok");
        },
        function (problem) {
          if (reading !== current) return;
          fileField.setAttribute("aria-invalid", "true");
          if (problem instanceof FileProblem) {
            say(status, problem.zh + "，无法发布", problem.en + "; it cannot be published", "", "error");
          } else {
            say(status, "无法读取文件", "The file cannot be read", "", "error");
          }
        }
      );
    }

    fileField.addEventListener("change", prepare);
    select.addEventListener("change", prepare); // the columns and the version are the kind's
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      publishCatalogue(form, reading);
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
      doneThenReload(message, request.done);
      return;
    }
    sayRefusal(message, result);
    if (result.status === 401) {
      signInAgainSoon();
      return;
    }
    enableFor(controls, ["device_admin"]);
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
    wireCatalogue();
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
