// Every job the page knows about, kept current by the server's event stream for every job
// (`GET /events`). Views subscribe with `jobs.addEventListener('change', ...)`: the event's
// `detail` is the changed job (or null after a snapshot replaced many).

import { request, streamUrl } from './api.js';

const FINAL = { complete: 'COMPLETE', failed: 'FAILED', canceled: 'CANCELED' };
const RECONNECT_MS = 3000;

// A job heard of only on the stream has no resultUrl yet; its endpoint and id make it.
function jobUrl(job) {
  return job.resultUrl || `/${job.endpoint}/${job.id}`;
}

export function isActive(job) {
  return job.status === 'QUEUED' || job.status === 'IN_PROGRESS';
}

class JobStore extends EventTarget {
  constructor() {
    super();
    this.jobs = new Map(); // id -> the job's item, as GET /jobs shows it
    this.seq = 0; // counts the stream's events, to tell which news is newer (see `posted`)
    this.heard = new Map(); // id -> this.seq when the stream last spoke of the job
    this.lastEventId = '';
    this.source = null;
    this.state = 'connecting'; // 'connecting' | 'live' | 'reconnecting'
    this.detailsTimer = null;
  }

  get(id) {
    return this.jobs.get(id);
  }

  all() {
    return [...this.jobs.values()];
  }

  // Merge what is known of a job (from a POST, an event, the listing) and tell the views.
  update(id, fields) {
    const job = { ...(this.jobs.get(id) || { id, imageUrls: [] }), ...fields };
    if (!isActive(job)) delete job.position;
    if (job.status !== 'IN_PROGRESS') delete job.progress;
    this.jobs.set(id, job);
    this.changed(job);
    return job;
  }

  changed(job) {
    this.dispatchEvent(new CustomEvent('change', { detail: job }));
  }

  setState(state) {
    this.state = state;
    this.dispatchEvent(new CustomEvent('connection', { detail: state }));
  }

  // Open the stream (again). EventSource reconnects by itself after a dropped connection; it
  // gives up only when refused (a 401 once a token expired, a 503 while the server stops), and
  // then a new stream is opened, with a new token, from the last event seen.
  async connect() {
    if (this.source) this.source.close();
    this.source = null;
    let url;
    try {
      url = await streamUrl('/events', this.lastEventId);
    } catch {
      this.retryLater();
      return;
    }
    const source = new EventSource(url);
    this.source = source;
    source.onopen = () => this.setState('live');
    source.onerror = () => {
      if (source !== this.source) return;
      if (source.readyState === EventSource.CLOSED) this.retryLater();
      else this.setState('reconnecting');
    };
    source.addEventListener('snapshot', (e) => this.onSnapshot(e));
    for (const name of ['queued', 'started', 'progress', 'image', ...Object.keys(FINAL)]) {
      source.addEventListener(name, (e) => this.onEvent(name, e));
    }
  }

  retryLater() {
    this.setState('reconnecting');
    if (this.source) this.source.close();
    this.source = null;
    setTimeout(() => this.connect(), RECONNECT_MS);
  }

  onSnapshot(e) {
    this.lastEventId = e.lastEventId;
    const seen = new Set();
    for (const item of JSON.parse(e.data).jobs) {
      seen.add(item.id);
      this.jobs.set(item.id, { ...this.jobs.get(item.id), ...item });
    }
    // Jobs that were unfinished and are not any more ended while the page was not listening:
    // ask each how it ended.
    for (const job of this.jobs.values()) {
      if (isActive(job) && !seen.has(job.id)) this.refresh(job);
    }
    this.dispatchEvent(new CustomEvent('change', { detail: null }));
  }

  onEvent(name, e) {
    this.lastEventId = e.lastEventId;
    const data = JSON.parse(e.data);
    this.heard.set(data.id, ++this.seq);
    const known = this.jobs.get(data.id);
    if (name in FINAL) {
      this.update(data.id, { ...data, status: FINAL[name] });
      return;
    }
    if (!known || !known.params) this.fetchDetailsSoon();
    if (name === 'queued') {
      this.update(data.id, { endpoint: data.endpoint, status: 'QUEUED', position: data.position });
    } else if (name === 'started' || name === 'progress') {
      this.update(data.id, { endpoint: data.endpoint, status: 'IN_PROGRESS', progress: data.progress });
    } else if (name === 'image') {
      const urls = known ? known.imageUrls || [] : [];
      if (!urls.includes(data.url)) {
        this.update(data.id, { endpoint: data.endpoint, imageUrls: [...urls, data.url] });
      }
    }
  }

  // A job the page has not seen whole (posted elsewhere): its parameters come from the
  // listing of unfinished jobs, asked once for a burst of such events.
  fetchDetailsSoon() {
    if (this.detailsTimer) return;
    this.detailsTimer = setTimeout(async () => {
      this.detailsTimer = null;
      try {
        const page = await request('GET', '/jobs?status=queued,running&limit=500');
        for (const item of page.items) {
          const known = this.jobs.get(item.id);
          // The stream is fresher on status and progress: only fill in what is missing.
          this.update(item.id, known ? { ...item, ...known, params: item.params } : item);
        }
      } catch {
        // Only the descriptions are missing; the stream goes on.
      }
    }, 300);
  }

  // A job the page posted: `doc` is the answer to a POST sent when `this.seq` was `mark`. The
  // stream may have told of the job since (a fast job can finish before the answer is read):
  // then the stream is newer, and the answer only adds what the stream does not carry.
  // The job's own URL always comes from the answer: stream events do not carry it.
  posted(id, doc, extra, mark) {
    const newer = (this.heard.get(id) || 0) > mark;
    return this.update(id, newer ? { resultUrl: doc.resultUrl, ...extra } : { ...doc, ...extra });
  }

  async refresh(job) {
    try {
      this.update(job.id, await request('GET', jobUrl(job)));
    } catch {
      // A job removed meanwhile: nothing more to show about it.
    }
  }

  async cancel(job) {
    this.update(job.id, await request('DELETE', jobUrl(job)));
  }
}

export const jobs = new JobStore();
