// Keeps the status page current by polling status.json; no framework, no page reload.
// The formatting rules mirror tgext/evolve/status_page/render.py.
(function () {
  'use strict';
  const root = document.getElementById('tgext-evolve');
  if (!root || !window.fetch) return;
  const data = root.dataset;
  const every = Math.max(0.5, Number(data.refresh) || 2) * 1000;
  const actions = JSON.parse(data.actions || '{}');
  const DASH = '\u2013';
  const ask = {credentials: 'same-origin', cache: 'no-store', headers: {Accept: 'application/json'}};

  const one = (selector, within) => (within || root).querySelector(selector);
  const each = (selector, within) => Array.from((within || root).querySelectorAll(selector));
  const put = (element, value) => {
    if (element && element.textContent !== value) element.textContent = value;
  };

  const when = iso => (iso ? iso.slice(0, 19).replace('T', ' ') + ' UTC' : DASH);
  const secondsText = value => {
    const s = Math.round(value);
    if (s < 60) return s + ' s';
    if (s < 3600) return Math.floor(s / 60) + ' min ' + (s % 60) + ' s';
    return Math.floor(s / 3600) + ' h ' + Math.floor((s % 3600) / 60) + ' min';
  };
  const durationText = ms => (ms === null ? DASH
    : ms < 10000 ? Math.round(ms) + ' ms' : (ms / 1000).toFixed(1) + ' s');
  const progressText = p => {
    let text = p.total ? p.done + '/' + p.total + ' (' + p.percent.toFixed(0) + '%)'
      : p.done + ' done';
    if (p.rate !== null && p.rate !== undefined) text += ' \u00b7 ' + p.rate.toFixed(1) + '/s';
    if (p.eta_seconds !== null && p.eta_seconds !== undefined) {
      text += ' \u00b7 ETA ' + secondsText(p.eta_seconds);
    }
    return text;
  };
  // status_document.ranges_text
  const rangesText = r => {
    const working = r.working.map(w => w.owner + ' (range ' + w.range + ', ' + w.items_done
      + ' items)').join(', ');
    return 'ranges: ' + r.done + '/' + r.total + ' done' + (r.failed ? ', ' + r.failed
      + ' failed' : '') + '; ' + (working ? 'working: ' + working : 'nobody working now');
  };
  const lockFields = lock => {
    if (!lock) {
      return {owner: 'never taken', lease: DASH, generation: DASH, acquired_at: DASH,
        renewed_at: DASH, released_by: DASH};
    }
    const lease = lock.owner === null ? DASH : lock.held
      ? lock.expires_in.toFixed(1) + ' s left' : 'expired ' + (-lock.expires_in).toFixed(1) + ' s ago';
    return {owner: lock.owner || 'free', lease: lease, generation: String(lock.generation),
      acquired_at: when(lock.acquired_at), renewed_at: when(lock.renewed_at),
      released_by: lock.released_by || DASH};
  };
  const summaryText = doc => {
    const counts = new Map();
    doc.evolutions.forEach(e => counts.set(e.state, (counts.get(e.state) || 0) + 1));
    const states = Array.from(counts, ([state, n]) => n + ' ' + state).join(', ');
    return doc.evolutions.length + ' evolutions: ' + states
      + ' (' + (doc.ok ? 'nothing to do' : 'not settled') + ')';
  };
  const failureKey = e => (e.error ? (e.finished_at || '') + '|' + e.error : '');

  function loadTraceback(id, details) {
    const pre = one('pre', details);
    fetch(data.tracebackUrl + '?id=' + encodeURIComponent(id), ask)
      .then(r => r.text())
      .then(text => put(pre, text), error => put(pre, 'Could not load it: ' + error.message));
  }

  function showEvolution(e) {
    const body = one('tbody[data-id="' + CSS.escape(e.id) + '"]');
    if (!body) return;
    body.className = 'evolution state-' + e.state;
    put(one('[data-field=state]', body), e.state);
    put(one('[data-field=reason]', body), e.reason || '');
    put(one('[data-field=attempts]', body), String(e.attempts));
    put(one('[data-field=owner]', body), e.owner || DASH);
    put(one('[data-field=started_at]', body), when(e.started_at));
    put(one('[data-field=finished_at]', body), when(e.finished_at));
    put(one('[data-field=duration_ms]', body), durationText(e.duration_ms));
    const progress = one('[data-field=progress]', body);
    progress.hidden = !e.progress;
    if (e.progress) {
      one('.bar span', progress).style.width = (e.progress.percent || 0) + '%';
      put(one('.progress-text', progress), progressText(e.progress));
    }
    const ranges = one('[data-field=ranges]', body);
    ranges.hidden = !(e.ranges && e.ranges.total);
    put(ranges, ranges.hidden ? '' : rangesText(e.ranges));
    const failure = one('[data-field=failure]', body);
    failure.hidden = !e.error;
    put(one('[data-field=error]', failure), e.error || '');
    const details = one('details', failure);
    const key = failureKey(e);
    if (details.dataset.key !== key) {
      details.dataset.key = key;
      put(one('pre', details), '');
      if (key && details.open) loadTraceback(e.id, details);
    }
    each('form.action', body).forEach(form => {
      const action = actions[form.dataset.action];
      // The states this evolution offers it in (a plain one is paused only before it starts).
      const states = form.dataset.states ? form.dataset.states.split(' ') : action && action.states;
      form.hidden = !action || states.indexOf(e.state) < 0;
    });
  }

  function showUnregistered(entries) {
    const rows = one('[data-field=unregistered]');
    if (!rows) return;
    rows.replaceChildren(...entries.map(e => {
      const row = document.createElement('tr');
      const cells = [e.id, e.state, String(e.attempts), when(e.finished_at), e.owner || DASH,
        e.error || DASH];
      cells.forEach((value, index) => {
        const cell = row.insertCell();
        const inner = document.createElement(index === 0 ? 'code' : 'span');
        if (index === 1) inner.className = 'state state-' + e.state;
        if (index === 4) cell.className = 'owner';
        inner.textContent = value;
        cell.appendChild(inner);
      });
      return row;
    }));
    rows.closest('table').hidden = !entries.length;
    one('[data-field=no-unregistered]').hidden = !!entries.length;
  }

  function show(doc) {
    doc.evolutions.forEach(showEvolution);
    const fields = lockFields(doc.lock);
    each('[data-lock]').forEach(element => put(element, fields[element.dataset.lock]));
    showUnregistered(doc.unregistered);
    put(one('[data-field=summary]'), summaryText(doc));
    put(one('[data-field=updated]'), 'as of ' + when(new Date().toISOString()));
  }

  function problem(message) {
    const banner = one('[data-field=error]');
    banner.hidden = !message;
    put(banner, message ? 'Not up to date: ' + message : '');
  }

  let timer = null;
  function poll() {
    clearTimeout(timer);
    fetch(data.statusUrl, ask)
      .then(r => r.json().then(doc => {
        if (!r.ok) throw new Error(doc.error || 'HTTP ' + r.status);
        return doc;
      }, () => { throw new Error('HTTP ' + r.status); }))
      .then(doc => { show(doc); problem(null); }, error => problem(error.message))
      .then(() => { timer = setTimeout(poll, every); });
  }

  root.addEventListener('toggle', event => {
    const details = event.target;
    if (details.open && details.dataset.key && !one('pre', details).textContent) {
      loadTraceback(details.closest('tbody').dataset.id, details);
    }
  }, true);

  // Confirm, then sign the form with a fresh token bound to what the evolution is now.  The
  // server checks the token and the state whatever the browser did.
  root.addEventListener('submit', event => {
    const form = event.target;
    const action = actions[form.dataset.action];
    if (!action) return;
    event.preventDefault();
    const id = form.elements.id.value;
    if (!window.confirm(action.confirm.replace('{id}', id))) return;
    fetch(data.actionsUrl, ask)
      .then(r => {
        if (!r.ok) throw new Error('HTTP ' + r.status);
        return r.json();
      })
      .then(offered => {
        const offer = (offered.actions[form.dataset.action] || {})[id];
        if (!offer) {
          window.alert(id + ': ' + form.dataset.action + ' is not possible any more.');
          poll();
          return;
        }
        form.elements.seen.value = offer.seen;
        form.elements.token.value = offer.token;
        form.submit();
      })
      .catch(error => window.alert('Could not prepare the form: ' + error.message));
  });

  timer = setTimeout(poll, every);
}());
