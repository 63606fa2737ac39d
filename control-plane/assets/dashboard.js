// The dashboards' one script: both pages (body[data-page]) read the /ws feed, keep the recent
// per-second history for the charts, and send admin actions to the REST endpoints with the
// token kept in sessionStorage. Everything shown is set with textContent, never parsed as HTML.
(() => {
  'use strict';

  const PAGE = document.body.dataset.page;
  const TOKEN_KEY = 'lb-admin-token';
  const HISTORY_KEPT = 300;
  const CHART_SECONDS = 60;
  const LOG_ROWS = 200;
  const BACKOFF_FIRST_MS = 500;
  const BACKOFF_MAX_MS = 10000;
  const COLORS = ['#2f6fdf', '#1f9d55', '#c77c02', '#d64545', '#7c4dcc', '#0f9aa8', '#b8487a', '#6b7a8f'];
  const SVG = 'http://www.w3.org/2000/svg';

  const $ = (id) => document.getElementById(id);
  const state = { history: [], latest: null, socket: null, backoff: BACKOFF_FIRST_MS, retry: null };

  // ---- small helpers ----
  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === 'class') e.className = v;
      else e.setAttribute(k, v);
    }
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function setText(id, text) {
    const e = $(id);
    if (e && e.textContent !== String(text)) e.textContent = String(text);
  }
  function num(v, digits) {
    if (v === null || v === undefined || Number.isNaN(v)) return '—';
    return digits === undefined ? String(v) : Number(v).toFixed(digits);
  }
  function badge(text, kind) {
    return el('span', { class: 'badge ' + (kind || '') }, text);
  }
  function ago(ms) {
    if (!ms) return 'never';
    const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
    if (s < 60) return s + ' s ago';
    if (s < 3600) return Math.round(s / 60) + ' min ago';
    return new Date(ms).toLocaleString();
  }
  // A time left, to the second: "45 s", "4 min 05 s", "2 h 03 min".
  function duration(ms) {
    const s = Math.max(0, Math.ceil(ms / 1000));
    if (s < 60) return s + ' s';
    if (s < 3600) return `${Math.floor(s / 60)} min ${String(s % 60).padStart(2, '0')} s`;
    return `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, '0')} min`;
  }
  function clock(ms) {
    const d = new Date(ms);
    const p = (n, w) => String(n).padStart(w || 2, '0');
    return `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}.${p(d.getMilliseconds(), 3)}`;
  }
  // A row per key in `tbody`, created by `make(key)` when new, removed when gone.
  function syncRows(tbody, attr, items, keyOf, make, update) {
    const existing = new Map();
    for (const tr of Array.from(tbody.rows)) existing.set(tr.getAttribute(attr), tr);
    let previous = null;
    for (const item of items) {
      const key = keyOf(item);
      let tr = existing.get(key);
      if (tr) existing.delete(key);
      else {
        tr = make(key, item);
        tr.setAttribute(attr, key);
      }
      const wanted = previous ? previous.nextSibling : tbody.firstChild;
      if (tr !== wanted) tbody.insertBefore(tr, wanted);
      update(tr, item);
      previous = tr;
    }
    for (const tr of existing.values()) tr.remove();
  }
  function cell(tr, field) {
    return tr.querySelector(`td[data-field="${field}"]`);
  }
  function fillCell(td, content) {
    if (typeof content === 'string' || typeof content === 'number') {
      if (td.textContent !== String(content) || td.children.length) td.textContent = String(content);
    } else {
      td.replaceChildren(content);
    }
  }

  // ---- token and admin calls ----
  function token() {
    return sessionStorage.getItem(TOKEN_KEY) || '';
  }
  function showTokenState(text, bad) {
    const e = $('token-state');
    e.textContent = text;
    e.className = bad ? 'result err' : 'hint';
  }
  function sendToken() {
    const t = token();
    if (t && state.socket && state.socket.readyState === WebSocket.OPEN) {
      state.socket.send(JSON.stringify({ token: t }));
    }
  }
  async function api(path, body) {
    const t = token();
    if (!t) throw new Error('enter the admin token first');
    let response;
    try {
      response = await fetch(path, {
        method: 'POST',
        headers: { 'content-type': 'application/json', authorization: 'Bearer ' + t },
        body: JSON.stringify(body),
      });
    } catch (e) {
      throw new Error('control plane unreachable: ' + e.message);
    }
    let answer = null;
    try {
      answer = await response.json();
    } catch (_) {
      answer = null;
    }
    if (!response.ok) {
      throw new Error((answer && answer.error) || `HTTP ${response.status}`);
    }
    return answer || {};
  }
  function showResult(id, ok, text) {
    const e = $(id);
    e.textContent = text;
    e.className = 'result ' + (ok ? 'ok' : 'err');
  }

  function setupToken() {
    const input = $('token-input');
    showTokenState(token() ? 'token saved for this tab' : 'no token: changes are refused');
    $('token-save').addEventListener('click', () => {
      const t = input.value.trim();
      if (!t) {
        showTokenState('type the admin token first', true);
        return;
      }
      sessionStorage.setItem(TOKEN_KEY, t);
      input.value = '';
      showTokenState('token saved for this tab');
      sendToken();
    });
    input.addEventListener('keydown', (e) => {
      if (e.key === 'Enter') $('token-save').click();
    });
    $('token-forget').addEventListener('click', () => {
      sessionStorage.removeItem(TOKEN_KEY);
      showTokenState('token forgotten');
      // A fresh socket has no admin rights.
      if (state.socket) state.socket.close();
    });
  }

  // ---- the feed ----
  function setConnection(live, text) {
    const e = $('conn-status');
    e.textContent = text;
    e.className = 'status ' + (live ? 'live' : 'down');
  }
  function connect() {
    state.retry = null;
    const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
    let socket;
    try {
      socket = new WebSocket(`${scheme}//${location.host}/ws`);
    } catch (_) {
      reconnectLater();
      return;
    }
    state.socket = socket;
    socket.onopen = () => {
      state.backoff = BACKOFF_FIRST_MS;
      setConnection(true, 'live');
      // A new socket sends the recent log again.
      const log = $('log');
      if (log) log.tBodies[0].replaceChildren();
      sendToken();
    };
    socket.onmessage = (event) => {
      let message;
      try {
        message = JSON.parse(event.data);
      } catch (_) {
        return;
      }
      try {
        handle(message);
      } catch (e) {
        console.error('dashboard update failed', e);
      }
    };
    socket.onclose = () => {
      if (state.socket === socket) state.socket = null;
      reconnectLater();
    };
  }
  function reconnectLater() {
    if (state.retry) return;
    // Full jitter, so many open pages do not reconnect in step after a restart.
    const delay = Math.round(state.backoff / 2 + Math.random() * state.backoff / 2);
    state.backoff = Math.min(state.backoff * 2, BACKOFF_MAX_MS);
    setConnection(false, `disconnected: reconnecting in ${Math.max(1, Math.round(delay / 1000))} s`);
    state.retry = setTimeout(connect, delay);
  }

  function handle(m) {
    if (m.type === 'auth') {
      if (m.error) showTokenState(m.error, true);
      return;
    }
    if (m.type !== 'state') return;
    state.latest = m;
    mergeHistory(m.history || []);
    renderCommon(m);
    if (PAGE === 'balancing') renderBalancing(m);
    if (PAGE === 'ratelimit') renderRateLimit(m);
  }
  function mergeHistory(seconds) {
    if (!seconds.length) return;
    const first = seconds[0].t;
    const kept = state.history.filter((s) => s.t < first);
    state.history = kept.concat(seconds).slice(-HISTORY_KEPT);
  }

  function renderCommon(m) {
    setText('total-requests', num(m.totals && m.totals.requests));
    const d = $('degraded');
    if (m.store_degraded) {
      const who = (m.degraded_data_planes || []).join(', ');
      d.textContent = `Rate-limit store degraded on ${who}: those data planes enforce limits on their own until Redis is back.`;
      d.hidden = false;
    } else {
      d.hidden = true;
    }
  }

  // ---- charts ----
  // Stacked areas, one per series; `points` are [{t, values: [...]}] oldest first. The drawing
  // uses the element's own width as its coordinate system, so text is not stretched.
  function drawStacked(svg, legend, names, points, colors) {
    const palette = colors || COLORS;
    const H = 180, PAD_L = 36, PAD_B = 16, PAD_T = 8;
    const W = Math.max(320, Math.round(svg.getBoundingClientRect().width) || 640);
    svg.setAttribute('viewBox', `0 0 ${W} ${H}`);
    const totals = points.map((p) => p.values.reduce((a, b) => a + b, 0));
    const top = Math.max(1, ...totals);
    const scaleMax = niceCeil(top);
    const x = (i) => PAD_L + (points.length <= 1 ? 0 : (i * (W - PAD_L - 4)) / (points.length - 1));
    const y = (v) => H - PAD_B - (v / scaleMax) * (H - PAD_B - PAD_T);
    const nodes = [];
    for (const frac of [0, 0.5, 1]) {
      const v = scaleMax * frac;
      const line = document.createElementNS(SVG, 'line');
      line.setAttribute('class', 'grid');
      line.setAttribute('x1', PAD_L); line.setAttribute('x2', W);
      line.setAttribute('y1', y(v)); line.setAttribute('y2', y(v));
      nodes.push(line);
      const label = document.createElementNS(SVG, 'text');
      label.setAttribute('x', 2); label.setAttribute('y', y(v) + 3);
      label.textContent = Number.isInteger(v) ? String(v) : v.toFixed(1);
      nodes.push(label);
    }
    const base = points.map(() => 0);
    names.forEach((name, k) => {
      const lower = base.slice();
      points.forEach((p, i) => { base[i] += p.values[k] || 0; });
      if (!points.length) return;
      const upperPath = points.map((_, i) => `${x(i).toFixed(1)},${y(base[i]).toFixed(1)}`);
      const lowerPath = points.map((_, i) => `${x(i).toFixed(1)},${y(lower[i]).toFixed(1)}`).reverse();
      const poly = document.createElementNS(SVG, 'polygon');
      poly.setAttribute('points', upperPath.concat(lowerPath).join(' '));
      poly.setAttribute('fill', palette[k % palette.length]);
      poly.setAttribute('fill-opacity', '0.75');
      poly.setAttribute('data-series', name);
      nodes.push(poly);
    });
    for (const [text, anchor, at] of [[`−${points.length} s`, 'start', PAD_L], ['now', 'end', W - 2]]) {
      const label = document.createElementNS(SVG, 'text');
      label.setAttribute('x', at); label.setAttribute('y', H - 3);
      label.setAttribute('text-anchor', anchor);
      label.textContent = text;
      nodes.push(label);
    }
    svg.replaceChildren(...nodes);
    legend.replaceChildren(...names.map((name, k) => {
      const item = el('span', {});
      const swatch = el('span', { class: 'swatch' });
      swatch.style.background = palette[k % palette.length];
      item.append(swatch, document.createTextNode(name));
      return item;
    }));
  }
  // One band per series, each on its own scale (its peak is written beside it), for when one
  // series dwarfs the others and a shared scale would flatten them to nothing.
  function drawSplit(svg, legend, names, points, colors) {
    const H = 180, PAD_L = 36, PAD_B = 16, GAP = 4;
    const W = Math.max(320, Math.round(svg.getBoundingClientRect().width) || 640);
    svg.setAttribute('viewBox', `0 0 ${W} ${H}`);
    const band = (H - PAD_B) / Math.max(1, names.length);
    const x = (i) => PAD_L + (points.length <= 1 ? 0 : (i * (W - PAD_L - 4)) / (points.length - 1));
    const nodes = [];
    names.forEach((name, k) => {
      const top = k * band + GAP / 2, bottom = (k + 1) * band - GAP / 2;
      const peak = Math.max(0, ...points.map((p) => p.values[k] || 0));
      const scaleMax = niceCeil(Math.max(1, peak));
      const y = (v) => bottom - (v / scaleMax) * (bottom - top);
      const line = document.createElementNS(SVG, 'line');
      line.setAttribute('class', 'grid');
      line.setAttribute('x1', PAD_L); line.setAttribute('x2', W);
      line.setAttribute('y1', bottom); line.setAttribute('y2', bottom);
      nodes.push(line);
      const label = document.createElementNS(SVG, 'text');
      label.setAttribute('x', 2); label.setAttribute('y', top + 9);
      label.setAttribute('data-band', name);
      label.textContent = String(scaleMax);
      nodes.push(label);
      if (points.length) {
        const upper = points.map((p, i) => `${x(i).toFixed(1)},${y(p.values[k] || 0).toFixed(1)}`);
        const lower = [`${x(points.length - 1).toFixed(1)},${bottom.toFixed(1)}`, `${x(0).toFixed(1)},${bottom.toFixed(1)}`];
        const poly = document.createElementNS(SVG, 'polygon');
        poly.setAttribute('points', upper.concat(lower).join(' '));
        poly.setAttribute('fill', colors[k % colors.length]);
        poly.setAttribute('fill-opacity', '0.75');
        poly.setAttribute('data-series', name);
        nodes.push(poly);
      }
      const title = document.createElementNS(SVG, 'text');
      title.setAttribute('x', W - 4); title.setAttribute('y', top + 9);
      title.setAttribute('text-anchor', 'end');
      title.textContent = `${name}: peak ${peak}/s`;
      nodes.push(title);
    });
    svg.replaceChildren(...nodes);
    legend.replaceChildren(...names.map((name, k) => {
      const item = el('span', {});
      const swatch = el('span', { class: 'swatch' });
      swatch.style.background = colors[k % colors.length];
      item.append(swatch, document.createTextNode(name));
      return item;
    }));
  }
  // Split when the largest series' peak is over SPLIT_RATIO times a smaller non-zero one's.
  const SPLIT_RATIO = 10;
  function dwarfed(names, points) {
    const peaks = names.map((_, k) => Math.max(0, ...points.map((p) => p.values[k] || 0))).filter((v) => v > 0);
    return peaks.length > 1 && Math.max(...peaks) > SPLIT_RATIO * Math.min(...peaks);
  }
  function niceCeil(v) {
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }
  function lastSeconds(n) {
    return state.history.slice(-n);
  }

  // ---- load balancing page ----
  function renderBalancing(m) {
    const last = m.per_second || {};
    setText('rps', num(last.requests));
    setText('forwarded-rate', num(last.forwarded));
    setText('refused-rate', num(last.refused));
    setText('cache-hit-rate', num(last.cache_hits));
    setText('eps', num(last.errors));
    setText('version', num(m.version));
    setText('strategy-current', m.strategy || '—');
    setText('planes-reporting', num(m.data_planes_reporting));

    const select = $('strategy-select');
    const strategies = m.strategies || [];
    if (select.options.length !== strategies.length) {
      select.replaceChildren(...strategies.map((s) => el('option', { value: s }, s)));
      select.value = m.strategy;
    } else if (!select.dataset.dirty && document.activeElement !== select) {
      select.value = m.strategy;
    }

    const backends = m.backends || [];
    syncRows($('backends').tBodies[0], 'data-address', backends, (b) => b.address,
      () => {
        const tr = el('tr');
        for (const f of ['address', 'health', 'weight', 'in_flight', 'rps', 'error_rate', 'quantiles', 'ewma', 'circuit', 'state', 'requests']) {
          tr.append(el('td', { 'data-field': f }));
        }
        return tr;
      },
      (tr, b) => {
        fillCell(cell(tr, 'address'), b.address);
        const health = b.health || (b.healthy ? 'healthy' : 'unhealthy');
        fillCell(cell(tr, 'health'), badge(health, health === 'healthy' ? 'good' : health === 'unhealthy' ? 'bad' : ''));
        fillCell(cell(tr, 'weight'), num(b.weight));
        fillCell(cell(tr, 'in_flight'), num(b.in_flight));
        fillCell(cell(tr, 'rps'), num(b.requests_per_s, 1));
        fillCell(cell(tr, 'error_rate'), b.error_rate === null || b.error_rate === undefined ? '—' : (100 * b.error_rate).toFixed(1) + ' %');
        fillCell(cell(tr, 'quantiles'), b.latency_p50_ms === null || b.latency_p50_ms === undefined
          ? '—' : `${num(b.latency_p50_ms, 1)} / ${num(b.latency_p99_ms, 1)} ms`);
        fillCell(cell(tr, 'ewma'), b.latency_ewma_ms ? num(b.latency_ewma_ms, 2) + ' ms' : '—');
        const circuit = b.circuit || 'unknown';
        fillCell(cell(tr, 'circuit'), badge(circuit.replace('_', '-'), circuit === 'closed' ? 'good' : circuit === 'open' ? 'bad' : circuit === 'half_open' ? 'warn' : ''));
        const flags = [];
        if (b.ejected) flags.push('ejected');
        if (b.draining) flags.push('draining');
        fillCell(cell(tr, 'state'), flags.length ? badge(flags.join(', '), 'warn') : badge('in rotation', 'good'));
        fillCell(cell(tr, 'requests'), num(b.requests));
      });

    const planes = m.data_planes || [];
    syncRows($('data-planes').tBodies[0], 'data-id', planes, (p) => p.id || '?',
      () => {
        const tr = el('tr');
        for (const f of ['id', 'listen', 'liveness', 'applied_version', 'nack', 'store', 'queue']) {
          tr.append(el('td', { 'data-field': f }));
        }
        return tr;
      },
      (tr, p) => {
        fillCell(cell(tr, 'id'), p.id || '?');
        fillCell(cell(tr, 'listen'), p.listen || '—');
        fillCell(cell(tr, 'liveness'), badge(p.liveness, p.liveness === 'live' ? 'good' : p.liveness === 'gone' ? 'warn' : 'bad'));
        const current = p.applied_version === m.version;
        const version = el('span', {}, String(p.applied_version) + ' ');
        version.append(badge(current ? 'current' : 'behind', current ? 'good' : 'warn'));
        fillCell(cell(tr, 'applied_version'), version);
        fillCell(cell(tr, 'nack'), p.last_nack_version ? `v${p.last_nack_version}: ${p.last_nack_error}` : '—');
        fillCell(cell(tr, 'store'), p.store_degraded ? badge('degraded', 'bad') : badge('ok', 'good'));
        fillCell(cell(tr, 'queue'), num(p.queue_depth));
      });

    const seconds = lastSeconds(CHART_SECONDS);
    const names = backends.map((b) => b.address);
    for (const s of seconds) {
      for (const a of Object.keys(s.backends || {})) if (!names.includes(a)) names.push(a);
    }
    drawStacked($('chart'), $('chart-legend'), names,
      seconds.map((s) => ({ t: s.t, values: names.map((a) => (s.backends || {})[a] || 0) })));
  }

  function setupBalancing() {
    const select = $('strategy-select');
    select.addEventListener('change', () => { select.dataset.dirty = '1'; });
    $('strategy-apply').addEventListener('click', async () => {
      const strategy = select.value;
      const button = $('strategy-apply');
      button.disabled = true;
      try {
        const r = await api('/change_strategy', { strategy });
        delete select.dataset.dirty;
        showResult('strategy-result', true, `strategy ${r.strategy}, version ${r.version}`);
      } catch (e) {
        showResult('strategy-result', false, e.message);
      } finally {
        button.disabled = false;
      }
    });
  }

  // ---- rate limiting page ----
  function renderRateLimit(m) {
    const last = m.per_second || {};
    setText('allowed-rate', num(last.allowed));
    setText('limited-rate', num(last.rate_limited));
    setText('banned-rate', num(last.banned));
    setText('blocked-rate', num(last.blocked));
    const t = m.totals || {};
    setText('total-refused', num((t.rate_limited || 0) + (t.banned || 0) + (t.blocked || 0)));

    const names = ['allowed', 'rate_limited', 'banned', 'blocked'];
    const seconds = lastSeconds(CHART_SECONDS);
    const points = seconds.map((s) => ({ t: s.t, values: names.map((n) => s[n] || 0) }));
    const colors = ['#1f9d55', '#c77c02', '#d64545', '#7c4dcc'];
    const chosen = $('chart-mode').value;
    const split = chosen === 'split' || (chosen === 'auto' && dwarfed(names, points));
    const chart = $('rl-chart');
    chart.dataset.mode = split ? 'split' : 'stacked';
    setText('chart-mode-note', chosen === 'auto' && split ? 'split: one series is over ten times another' : '');
    (split ? drawSplit : drawStacked)(chart, $('chart-legend'), names, points, colors);

    const keysBody = $('keys').tBodies[0];
    if (!m.admin) {
      setText('keys-note', 'Save the admin token to see API keys and the request log.');
      setText('keys-count', '');
      keysBody.replaceChildren();
      setText('bans-note', 'Save the admin token to see the bans.');
      setText('bans-count', '');
      $('bans').tBodies[0].replaceChildren();
      return;
    }
    renderBans(m);
    const tierChoice = $('new-key-tier');
    if (tierChoice.options.length !== (m.tiers || []).length) {
      tierChoice.replaceChildren(...(m.tiers || []).map((name) => el('option', { value: name }, name)));
      if (m.default_tier) tierChoice.value = m.default_tier;
    }
    const keys = m.keys || [];
    setText('keys-note', keys.length ? '' : 'No API keys yet.');
    setText('keys-count', keys.length < (m.keys_total || 0) ? `${keys.length} most recent of ${m.keys_total}` : `${keys.length}`);
    const tiers = m.tiers || [];
    syncRows(keysBody, 'data-key-id', keys, (k) => k.api_key_id,
      (id) => makeKeyRow(id, tiers),
      (tr, k) => {
        fillCell(cell(tr, 'id'), k.api_key_id);
        fillCell(cell(tr, 'label'), k.label || '');
        const select = tr.querySelector('select.tier-select');
        if (select.options.length !== tiers.length) {
          select.replaceChildren(...tiers.map((name) => el('option', { value: name }, name)));
          select.value = k.tier;
        }
        tr.querySelector('.tier-current').textContent = k.tier;
        if (!select.dataset.dirty && document.activeElement !== select) select.value = k.tier;
        const status = tr.querySelector('.block-state');
        const shown = k.status || (k.blocked ? 'blocked' : 'active');
        const kind = { blocked: 'violet', banned: 'bad', active: 'good' }[shown] || '';
        const state = badge(shown, kind);
        if (shown === 'banned' && k.banned_for_ms) state.title = duration(k.banned_for_ms) + ' left';
        status.replaceChildren(state);
        const toggle = tr.querySelector('button.block-toggle');
        toggle.textContent = k.blocked ? 'Unblock' : 'Block';
        toggle.dataset.blocked = k.blocked ? '1' : '';
        toggle.className = 'block-toggle ' + (k.blocked ? 'secondary' : 'danger');
        fillCell(cell(tr, 'requests'), num(k.requests));
        fillCell(cell(tr, 'rejected'), num(k.rejected));
        fillCell(cell(tr, 'last_seen'), ago(k.last_seen_ms));
      });

    if (!$('log-pause').checked) appendLog(m.log || []);
  }

  // The bans in force, each with its time left and a button that lifts it everywhere.
  function renderBans(m) {
    const bans = m.bans || [];
    if (m.bans_error) setText('bans-note', 'Bans unavailable: ' + m.bans_error);
    else setText('bans-note', bans.length ? '' : 'No bans in force.');
    setText('bans-count', bans.length ? String(bans.length) : '');
    syncRows($('bans').tBodies[0], 'data-ban', bans, (b) => `${b.client}@${b.data_plane || ''}`,
      (_, b) => {
        const tr = el('tr');
        for (const f of ['client', 'data_plane', 'left', 'count', 'action']) tr.append(el('td', { 'data-field': f }));
        const lift = el('button', { type: 'button', class: 'lift-ban secondary' }, 'Lift');
        lift.addEventListener('click', async () => {
          lift.disabled = true;
          try {
            const r = await api('/admin/lift_ban', { client: b.client });
            showResult('ban-result', true, `${r.client}: ban lifted (version ${r.version})`);
          } catch (e) {
            showResult('ban-result', false, `${b.client}: ${e.message}`);
            lift.disabled = false;
          }
        });
        cell(tr, 'action').append(lift);
        return tr;
      },
      (tr, b) => {
        fillCell(cell(tr, 'client'), b.client);
        fillCell(cell(tr, 'data_plane'), b.data_plane || 'every data plane');
        fillCell(cell(tr, 'left'), duration(b.ends_in_ms));
        fillCell(cell(tr, 'count'), num(b.count));
      });
  }

  // A key made on the page is shown once, with a button that copies it.
  function setupCreateKey() {
    const form = $('create-key');
    form.addEventListener('submit', async (event) => {
      event.preventDefault();
      const submit = $('create-key-submit');
      submit.disabled = true;
      try {
        const r = await api('/admin/keys', { tier: $('new-key-tier').value, label: $('new-key-label').value });
        $('new-key-value').textContent = r.api_key;
        setText('new-key-copied', '');
        $('new-key').hidden = false;
        $('new-key-label').value = '';
        showResult('key-result', true, `${r.api_key_id}: created, tier ${r.tier} (version ${r.version})`);
      } catch (e) {
        showResult('key-result', false, `new key: ${e.message}`);
      } finally {
        submit.disabled = false;
      }
    });
    $('new-key-copy').addEventListener('click', async () => {
      const key = $('new-key-value').textContent;
      try {
        await navigator.clipboard.writeText(key);
        setText('new-key-copied', 'copied');
      } catch (_) {
        // No clipboard access (an insecure origin, or denied): select it for Ctrl-C.
        const range = document.createRange();
        range.selectNodeContents($('new-key-value'));
        const selection = window.getSelection();
        selection.removeAllRanges();
        selection.addRange(range);
        setText('new-key-copied', 'selected: press Ctrl-C to copy');
      }
    });
  }

  function makeKeyRow(id, tiers) {
    const tr = el('tr');
    for (const f of ['id', 'label', 'tier', 'blocked', 'requests', 'rejected', 'last_seen']) {
      tr.append(el('td', { 'data-field': f }));
    }
    const select = el('select', { class: 'tier-select', 'aria-label': `tier of ${id}` });
    select.replaceChildren(...tiers.map((name) => el('option', { value: name }, name)));
    select.addEventListener('change', () => { select.dataset.dirty = '1'; });
    const apply = el('button', { type: 'button', class: 'tier-apply secondary' }, 'Apply');
    apply.addEventListener('click', async () => {
      apply.disabled = true;
      try {
        const r = await api('/admin/upgrade_tier', { api_key_id: id, tier: select.value });
        delete select.dataset.dirty;
        showResult('key-result', true, `${r.api_key_id}: tier ${r.tier} (version ${r.version})`);
      } catch (e) {
        showResult('key-result', false, `${id}: ${e.message}`);
      } finally {
        apply.disabled = false;
      }
    });
    const tierCell = cell(tr, 'tier');
    tierCell.append(el('span', { class: 'tier-current', hidden: '' }), select, document.createTextNode(' '), apply);
    const toggle = el('button', { type: 'button', class: 'block-toggle danger' }, 'Block');
    toggle.addEventListener('click', async () => {
      const blocked = !toggle.dataset.blocked;
      toggle.disabled = true;
      try {
        const r = await api('/admin/block_key', { api_key_id: id, blocked });
        showResult('key-result', true, `${r.api_key_id}: ${r.blocked ? 'blocked' : 'unblocked'} (version ${r.version})`);
      } catch (e) {
        showResult('key-result', false, `${id}: ${e.message}`);
      } finally {
        toggle.disabled = false;
      }
    });
    cell(tr, 'blocked').append(el('span', { class: 'block-state' }), document.createTextNode(' '), toggle);
    return tr;
  }

  const DECISION_KIND = { proxied: 'good', cache_hit: 'good', rate_limited: 'warn', shed: 'warn', banned: 'bad', blocked: 'violet', no_backend: 'bad', error: 'bad' };
  function appendLog(entries) {
    const body = $('log').tBodies[0];
    for (const e of entries) {
      const tr = el('tr', { 'data-request-id': e.request_id || '' });
      tr.append(
        el('td', {}, clock(e.timestamp_ms)),
        el('td', { class: 'wrap' }, e.data_plane),
        el('td', { class: 'wrap' }, e.client),
        el('td', { class: 'wrap' }, e.key_id || '—'),
        el('td', {}, e.tier || '—'),
        el('td', {}, e.method),
        el('td', { class: 'path', title: e.path }, e.path),
        el('td', {}, e.status),
        el('td', {}),
        el('td', { class: 'wrap' }, e.backend || '—'),
        el('td', {}, num(e.latency_ms, 2) + ' ms'),
      );
      tr.cells[8].append(badge(e.decision || '?', DECISION_KIND[e.decision] || ''));
      if (e.count > 1) tr.cells[8].append(el('span', { class: 'count', title: e.count + ' identical refusals' }, ' ×' + num(e.count, 0)));
      body.insertBefore(tr, body.firstChild);
    }
    while (body.rows.length > LOG_ROWS) body.deleteRow(body.rows.length - 1);
  }

  setupToken();
  if (PAGE === 'balancing') setupBalancing();
  if (PAGE === 'ratelimit') setupCreateKey();
  connect();
})();
