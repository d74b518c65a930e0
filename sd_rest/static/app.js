// The page's start: the tabs, the API key (asked once, when the server wants one), then the
// live job store and the three views.

import { checkKey, forgetKey, hasKey, setKey, whenUnauthorized } from './api.js';
import { setupBrowse } from './browse.js';
import { jobs } from './jobs.js';
import { setupMake, useAsInput, useSettings } from './make.js';
import { PAGE_DATA } from './util.js';
import { openViewer, setupViewer } from './viewer.js';
import { setupLatest, setupWatch } from './watch.js';

const TABS = ['make', 'watch', 'browse'];
let browse = null;

// --- tabs: the ARIA tabs pattern (arrow keys move between tabs), the URL's #hash follows ---

function showTab(name, { focus = false } = {}) {
  if (!TABS.includes(name)) name = 'make';
  for (const tab of TABS) {
    const button = document.getElementById(`tab-${tab}`);
    const selected = tab === name;
    button.setAttribute('aria-selected', String(selected));
    button.tabIndex = selected ? 0 : -1;
    document.getElementById(tab).hidden = !selected;
    if (selected && focus) button.focus();
  }
  if (location.hash !== `#${name}`) history.replaceState(null, '', `#${name}`);
  if (name === 'browse' && browse) browse.shown();
}

function setupTabs() {
  for (const tab of TABS) {
    const button = document.getElementById(`tab-${tab}`);
    button.addEventListener('click', () => showTab(tab));
    button.addEventListener('keydown', (e) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[e.key];
      if (e.key === 'Home' || e.key === 'End' || step) {
        e.preventDefault();
        const i = e.key === 'Home' ? 0 : e.key === 'End' ? TABS.length - 1
          : (TABS.indexOf(tab) + step + TABS.length) % TABS.length;
        showTab(TABS[i], { focus: true });
      }
    });
  }
  window.addEventListener('hashchange', () => showTab(location.hash.slice(1)));
}

// --- the API key ---------------------------------------------------------------------------

const keyDialog = document.getElementById('key-dialog');

// Resolves once the server accepts the key (or needs none): asks for it as often as needed.
function askForKey(message = '') {
  const form = document.getElementById('key-form');
  const input = document.getElementById('key-input');
  const error = document.getElementById('key-error');
  error.textContent = message;
  return new Promise((resolve) => {
    form.onsubmit = async (e) => {
      e.preventDefault();
      const value = input.value.trim();
      if (!value) {
        error.textContent = 'Enter the key the server was started with.';
        return;
      }
      setKey(value, document.getElementById('key-remember').checked);
      try {
        if (await checkKey()) {
          input.value = '';
          keyDialog.close();
          updateKeyButton();
          resolve();
          return;
        }
        forgetKey();
        error.textContent = 'The server refused this key.';
      } catch {
        error.textContent = 'The server could not be reached.';
      }
      input.select();
    };
    if (!keyDialog.open) keyDialog.showModal();
    input.focus();
  });
}

// The dialog cannot be dismissed without a key: nothing works without one.
keyDialog.addEventListener('cancel', (e) => e.preventDefault());

function updateKeyButton() {
  document.getElementById('forget-key').hidden = !hasKey();
}

// The page says whether the server wants a key: without one nothing is asked; with one, a
// key kept from before is checked, and the person asked only when there is none or it fails.
async function ensureKey() {
  if (!PAGE_DATA.keyRequired) return;
  while (hasKey()) {
    try {
      if (await checkKey()) return;
      forgetKey();
    } catch {
      // The server is not answering: try again shortly.
      await new Promise((resolve) => setTimeout(resolve, 2000));
    }
  }
  await askForKey();
}

// --- the connection's state, shown in the header -------------------------------------------

function showConnection(state) {
  const el = document.getElementById('connection');
  el.dataset.state = state;
  el.textContent = { live: 'Live', connecting: 'Connecting…', reconnecting: 'Reconnecting…' }[state];
}

// --- start -----------------------------------------------------------------------------------

async function start() {
  setupTabs();
  showTab(location.hash.slice(1) || 'make');
  setupViewer({
    // The Make tab first: the form's button can only take the focus once it is shown.
    use: (job) => { showTab('make'); useSettings(job.endpoint, job.params); },
    reseed: (job) => { showTab('make'); useSettings(job.endpoint, job.params, { newSeed: true }); },
    asInput: (job, url) => { showTab('make'); useAsInput(url); },
  });
  const latest = setupLatest(document.getElementById('latest'), openViewer);
  setupMake(document.getElementById('picker'), document.getElementById('forms'), latest);
  setupWatch(openViewer);
  browse = setupBrowse(openViewer, () => !document.getElementById('browse').hidden);
  jobs.addEventListener('connection', (e) => showConnection(e.detail));
  document.getElementById('forget-key').addEventListener('click', () => {
    forgetKey();
    location.reload();
  });

  await ensureKey();
  updateKeyButton();
  // A key refused later (the server restarted with another): ask again, then reconnect.
  let asking = false;
  whenUnauthorized(async () => {
    if (asking) return;
    asking = true;
    forgetKey();
    updateKeyButton();
    await askForKey('The server no longer accepts the key.');
    asking = false;
    jobs.connect();
  });
  jobs.connect();
  latest.newest();
  if (!document.getElementById('browse').hidden) browse.shown();
}

start();
