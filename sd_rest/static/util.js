// Small helpers shared by the page's modules: the page's data, building elements, and naming
// things for people.

// Written into the page by the server (page.py): the field table, each endpoint's defaults,
// and whether an API key is needed.
export const PAGE_DATA = JSON.parse(document.getElementById('page-data').textContent);

// h('button', {class: 'x', onclick: f}, 'text', child): an element with attributes, properties
// (on* handlers, `dataset`) and children (strings become text nodes; null/false are skipped).
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith('on')) el.addEventListener(name.slice(2), value);
    else if (name === 'dataset') Object.assign(el.dataset, value);
    else if (name in el && typeof value !== 'string') el[name] = value;
    else el.setAttribute(name, value === true ? '' : value);
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
}

// Replace every child of `el`.
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

export const ENDPOINT_NAMES = {
  'text-to-image': 'Text to image',
  'image-to-image': 'Image to image',
  'inpaint-image': 'Inpaint',
};

export const FIELD_NAMES = {
  prompt: 'Prompt',
  iterations: 'Iterations',
  batchSize: 'Batch size',
  steps: 'Steps',
  seed: 'Seed',
  width: 'Width',
  height: 'Height',
  guidanceScale: 'Guidance scale',
  eta: 'Eta',
  plms: 'PLMS sampler',
  strength: 'Strength',
  image: 'Image',
  mask: 'Mask',
};

// The job's id from its result URL (`/<endpoint>/<id>`).
export function jobId(resultUrl) {
  return resultUrl.split('/').pop();
}

export function shortId(id) {
  return id.slice(0, 8);
}

// How a job is called in lists: its prompt, or what it was made from.
export function jobTitle(job) {
  const prompt = job.params && job.params.prompt;
  if (prompt) return prompt;
  if (job.endpoint === 'inpaint-image') return `Inpaint ${shortId(job.id)}`;
  return `${ENDPOINT_NAMES[job.endpoint] || job.endpoint} ${shortId(job.id)}`;
}

export function totalImages(job) {
  if (job.progress) return job.progress.totalImages;
  const params = job.params || {};
  return (params.iterations || 1) * (params.batchSize || 1);
}

const timeFormat = new Intl.DateTimeFormat(undefined, {
  month: 'short', day: 'numeric', hour: 'numeric', minute: '2-digit',
});
const yearFormat = new Intl.DateTimeFormat(undefined, { dateStyle: 'medium', timeStyle: 'short' });

// A time in the person's own zone and language; the year only when it is not this one.
export function when(iso) {
  if (!iso) return '';
  const date = new Date(iso);
  return (date.getFullYear() === new Date().getFullYear() ? timeFormat : yearFormat).format(date);
}

export function percent(fraction) {
  return `${Math.round(Math.max(0, Math.min(1, fraction)) * 100)} %`;
}

// A random seed in the field's range (the scripts take 32-bit seeds).
export function randomSeed() {
  const buffer = new Uint32Array(1);
  crypto.getRandomValues(buffer);
  return buffer[0];
}

// Values kept in localStorage: settings are no secret, and a full or disabled storage must not
// break the page, so failures are ignored.
export function loadSaved(name, fallback = null) {
  try {
    const text = localStorage.getItem(`sd-rest:${name}`);
    return text === null ? fallback : JSON.parse(text);
  } catch {
    return fallback;
  }
}

export function save(name, value) {
  try {
    localStorage.setItem(`sd-rest:${name}`, JSON.stringify(value));
  } catch {
    // Storage full or disabled: the settings are simply not remembered.
  }
}
