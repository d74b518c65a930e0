// Browse: the finished jobs from the listing (`GET /jobs?status=complete`), newest first, a
// page at a time. The listing pages with a cursor, so "Newer" goes back through the cursors
// already used. A job that completes while the first page is shown is added by reloading it.

import { request, showImage } from './api.js';
import { jobs } from './jobs.js';
import { ENDPOINT_NAMES, fill, h, jobTitle, loadSaved, save, when } from './util.js';

const PAGE_SIZE = 24;

export function setupBrowse(open, isVisible) {
  const gallery = document.getElementById('gallery');
  const status = document.getElementById('browse-status');
  const filter = document.getElementById('browse-endpoint');
  const newer = document.getElementById('browse-newer');
  const older = document.getElementById('browse-older');
  const pageLabel = document.getElementById('browse-page');
  const pager = pageLabel.parentElement;
  let cursors = ['']; // the cursor of each page seen so far ('' is the first)
  let page = 0;
  let nextCursor = null;
  let stale = true;
  let loading = null;

  filter.value = loadSaved('browse-endpoint', '');
  filter.addEventListener('change', () => {
    save('browse-endpoint', filter.value);
    cursors = [''];
    load(0);
  });
  document.getElementById('browse-refresh').addEventListener('click', () => load(page));
  newer.addEventListener('click', () => load(page - 1));
  older.addEventListener('click', () => {
    cursors[page + 1] = nextCursor;
    load(page + 1);
  });

  async function load(n) {
    const query = new URLSearchParams({ status: 'complete', limit: PAGE_SIZE });
    if (filter.value) query.set('endpoint', filter.value);
    if (cursors[n]) query.set('cursor', cursors[n]);
    status.textContent = 'Loading…';
    const mine = (loading = request('GET', `/jobs?${query}`));
    let result;
    try {
      result = await mine;
    } catch (error) {
      if (mine === loading) status.textContent = `The gallery could not be loaded: ${error.message}`;
      return;
    }
    if (mine !== loading) return; // a later load superseded this one
    page = n;
    stale = false;
    nextCursor = result.nextCursor;
    fill(gallery, result.items.map((job) => tile(job, open)));
    status.textContent = result.items.length || page > 0 ? '' : 'Nothing finished yet: make something first.';
    newer.disabled = page === 0;
    older.disabled = !nextCursor;
    pageLabel.textContent = `Page ${page + 1}`;
    pager.hidden = page === 0 && !nextCursor; // one page: nothing to turn
  }

  jobs.addEventListener('change', (e) => {
    if (e.detail && e.detail.status === 'COMPLETE' && page === 0) {
      stale = true;
      if (isVisible()) load(0);
    }
  });

  return {
    // The tab was shown: load the first time, and again if something finished meanwhile.
    shown() {
      if (stale) load(page);
    },
  };
}

function tile(job, open) {
  const title = jobTitle(job);
  const count = job.imageUrls.length;
  const img = h('img', { alt: '', loading: 'lazy' });
  if (count) showImage(img, job.imageUrls[0]);
  return h('li', { class: 'tile', dataset: { id: job.id } },
    h('button', {
      type: 'button', class: 'tile-open', disabled: count === 0,
      'aria-label': `Open ${title}${count > 1 ? ` (${count} images)` : ''}`,
      onclick: () => open(job, 0),
    }, img, count > 1 ? h('span', { class: 'count', 'aria-hidden': 'true' }, `×${count}`) : null),
    h('p', { class: 'tile-title', title }, title),
    // The seed tells apart the variations of one prompt.
    h('p', { class: 'hint' }, `${ENDPOINT_NAMES[job.endpoint] || job.endpoint} · seed ${job.params.seed}`),
    h('p', { class: 'hint' }, when(job.finishedAt)));
}
