// An image large, in a modal dialog (Escape closes it; ← and → step through the job's images),
// with the job's parameters, a download link and the ways to reuse its settings.

import { imageUrl } from './api.js';
import { ENDPOINT_NAMES, FIELD_NAMES, fill, h, shortId, when } from './util.js';

const dialog = document.getElementById('viewer');
const title = document.getElementById('viewer-title');
const img = document.getElementById('viewer-img');
const params = document.getElementById('viewer-params');
const download = document.getElementById('viewer-download');
const prev = document.getElementById('viewer-prev');
const next = document.getElementById('viewer-next');

let job = null;
let index = 0;

// `actions`: use(job), reseed(job), asInput(url); each closes the viewer first.
export function setupViewer(actions) {
  document.getElementById('viewer-close').addEventListener('click', () => dialog.close());
  prev.addEventListener('click', () => show(index - 1));
  next.addEventListener('click', () => show(index + 1));
  dialog.addEventListener('keydown', (e) => {
    if (e.key === 'ArrowLeft' && index > 0) show(index - 1);
    if (e.key === 'ArrowRight' && job && index < job.imageUrls.length - 1) show(index + 1);
  });
  // A click on the backdrop (outside the dialog's box) closes it, as people expect.
  dialog.addEventListener('click', (e) => {
    if (e.target === dialog) dialog.close();
  });
  const act = (name) => () => {
    dialog.close();
    actions[name](job, job.imageUrls[index]);
  };
  document.getElementById('viewer-use').addEventListener('click', act('use'));
  document.getElementById('viewer-reseed').addEventListener('click', act('reseed'));
  document.getElementById('viewer-as-input').addEventListener('click', act('asInput'));
}

export function openViewer(theJob, theIndex = 0) {
  job = theJob;
  showParams();
  show(theIndex);
  if (!dialog.open) dialog.showModal();
}

async function show(n) {
  if (!job || n < 0 || n >= job.imageUrls.length) return;
  index = n;
  const url = job.imageUrls[n];
  const count = job.imageUrls.length;
  const name = ENDPOINT_NAMES[job.endpoint] || job.endpoint;
  title.textContent = count > 1 ? `${name}: image ${n + 1} of ${count}` : name;
  img.alt = `Image ${n + 1}${job.params && job.params.prompt ? `: ${job.params.prompt}` : ''}`;
  prev.disabled = n === 0;
  next.disabled = n === count - 1;
  prev.hidden = next.hidden = count < 2;
  download.download = `sd-rest-${shortId(job.id)}-${n + 1}.png`;
  download.removeAttribute('href');
  const src = await imageUrl(url);
  if (job.imageUrls[index] !== url) return; // another image was chosen meanwhile
  img.src = src;
  download.href = src;
}

function showParams() {
  const rows = [];
  const add = (term, value) => rows.push(h('dt', {}, term), h('dd', {}, String(value)));
  add('Endpoint', ENDPOINT_NAMES[job.endpoint] || job.endpoint);
  for (const [name, value] of Object.entries(job.params || {})) add(FIELD_NAMES[name] || name, value);
  if (job.finishedAt) add('Finished', when(job.finishedAt));
  add('Job', shortId(job.id));
  fill(params, rows);
}
