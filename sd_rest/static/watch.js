// Watch: the running jobs with their live progress, the waiting ones in queue order with their
// position and a cancel button, and the jobs that finished while the page was open, with their
// images. Everything comes from the job store (jobs.js), fed by the event stream.

import { JobCard } from './cards.js';
import { request } from './api.js';
import { isActive, jobs } from './jobs.js';
import { ENDPOINT_NAMES, fill, h, jobTitle, totalImages } from './util.js';

const FINISHED_SHOWN = 12;

export function setupWatch(open) {
  const running = document.getElementById('running');
  const queue = document.getElementById('queue');
  const finished = document.getElementById('finished');
  const count = document.getElementById('watch-count');
  // Cards and rows are kept across renders and updated in place: a render that changes
  // nothing moves nothing, so keyboard focus (on a Cancel button, say) stays where it is.
  const cards = new Map(); // id -> JobCard
  const rows = new Map(); // id -> QueueRow

  function card(job) {
    let entry = cards.get(job.id);
    if (entry) entry.update(job);
    else cards.set(job.id, (entry = new JobCard(job, open)));
    return entry.el;
  }

  function row(job) {
    let entry = rows.get(job.id);
    if (entry) entry.update(job);
    else rows.set(job.id, (entry = new QueueRow(job)));
    return entry.el;
  }

  function render() {
    const all = jobs.all();
    const active = all.filter(isActive);
    // Running: IN_PROGRESS, and the job whose script is loading (position 0).
    const now = active.filter((job) => job.status === 'IN_PROGRESS' || job.position === 0);
    const waiting = active.filter((job) => !now.includes(job))
      .sort((a, b) => (a.position ?? Infinity) - (b.position ?? Infinity));
    const done = all.filter((job) => !isActive(job) && job.status)
      .sort((a, b) => (b.finishedAt || '').localeCompare(a.finishedAt || ''))
      .slice(0, FINISHED_SHOWN);
    sync(running, now.map(card));
    sync(queue, waiting.map(row));
    sync(finished, done.map(card));
    for (const [list, empty] of [[now, 'running-empty'], [waiting, 'queue-empty'], [done, 'finished-empty']]) {
      document.getElementById(empty).hidden = list.length > 0;
    }
    count.hidden = active.length === 0;
    count.textContent = String(active.length);
    count.setAttribute('aria-label', `${active.length} unfinished`);
  }

  jobs.addEventListener('change', render);
  render();
}

// Make `container`'s children exactly `elements`, touching the DOM only where they differ.
function sync(container, elements) {
  const children = [...container.children];
  if (children.length === elements.length && children.every((el, i) => el === elements[i])) return;
  fill(container, elements);
}

// A waiting job: one line with its place in the queue.
class QueueRow {
  constructor(job) {
    this.position = h('span', { class: 'position' });
    this.title = h('span', { class: 'queued-title' });
    this.detail = h('span', { class: 'hint' });
    this.cancelButton = h('button', { type: 'button', class: 'danger', onclick: () => this.cancel() }, 'Cancel');
    this.el = h('li', { class: 'queued', dataset: { id: job.id } }, this.position,
      h('span', { class: 'queued-text' }, this.title, this.detail), this.cancelButton);
    this.update(job);
  }

  update(job) {
    this.job = job;
    const title = jobTitle(job);
    const total = totalImages(job);
    this.position.textContent = job.position ?? '–';
    this.position.setAttribute('aria-label', `Position ${job.position ?? 'not known yet'}`);
    this.title.textContent = title;
    this.title.title = title;
    this.detail.textContent = `${ENDPOINT_NAMES[job.endpoint] || job.endpoint} · ${total} image${total === 1 ? '' : 's'}`;
    this.cancelButton.setAttribute('aria-label', `Cancel ${title}`);
  }

  async cancel() {
    this.cancelButton.disabled = true;
    try {
      await jobs.cancel(this.job);
    } catch {
      this.cancelButton.disabled = false;
    }
  }
}

// Make's "Latest" panel: the last job posted from this page, as a card that follows it. Before
// this page has posted one (a reload, a new tab), the newest job the server has, from anywhere.
export function setupLatest(panel, open) {
  let card = null;
  let id = null;
  jobs.addEventListener('change', (e) => {
    const job = e.detail ? (e.detail.id === id ? e.detail : null) : jobs.get(id);
    if (card && job) card.update(job);
  });
  const show = (job) => {
    if (job.id !== id) {
      id = job.id;
      card = new JobCard(job, open);
      fill(panel, card.el);
    } else {
      card.update(job);
    }
  };
  // Called once the key is settled. A job posted meanwhile wins: the listing's answer is then
  // older news.
  show.newest = async () => {
    let page;
    try {
      page = await request('GET', '/jobs?limit=1');
    } catch {
      return; // the panel keeps its hint; the next job posted fills it
    }
    const item = page.items[0];
    if (!item || id !== null) return;
    // Through the store, so the stream's news of it (progress, images) reaches the card; what
    // the store already heard from the stream is newer than the listing.
    const known = jobs.get(item.id);
    show(known ? jobs.update(item.id, { ...item, ...known }) : jobs.update(item.id, item));
  };
  return show;
}
