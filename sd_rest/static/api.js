// The server's API, as the page uses it: every request carries the API key when there is one,
// errors come back as ApiError with the server's code, message and field, images come as
// blob URLs when a key is needed (an <img> cannot send a header), and event streams get a
// short-lived token (EventSource cannot send a header either).

// The key lives in sessionStorage (this tab, until it closes) unless the person asked to
// remember it on this device (localStorage). It is only ever sent to this server, in the
// Authorization header; never in a URL.
const KEY_NAME = 'sd-rest:api-key';

export class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || `the server answered ${status}`);
    this.status = status;
    this.code = error.code || 'http_error';
    this.field = error.field || null;
  }
}

let key = sessionStorage.getItem(KEY_NAME) || localStorage.getItem(KEY_NAME) || '';
// Told when the server refuses the key (app.js asks for one again).
let onUnauthorized = () => {};

export function hasKey() {
  return key !== '';
}

export function setKey(value, remember) {
  key = value;
  sessionStorage.setItem(KEY_NAME, value);
  if (remember) localStorage.setItem(KEY_NAME, value);
  else localStorage.removeItem(KEY_NAME);
}

export function forgetKey() {
  key = '';
  sessionStorage.removeItem(KEY_NAME);
  localStorage.removeItem(KEY_NAME);
  imageCache.clear();
}

export function whenUnauthorized(callback) {
  onUnauthorized = callback;
}

function headers(extra = {}) {
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

// A JSON request; resolves to the body, or throws ApiError (or a TypeError when the network
// failed). A POST of a job answers 303; fetch follows it to the job's status (same origin,
// so the Authorization header goes along).
export async function request(method, path, body = undefined) {
  const response = await fetch(path, { method, body, headers: headers({ Accept: 'application/json' }) });
  let doc = null;
  try {
    doc = await response.json();
  } catch {
    doc = null;
  }
  if (!response.ok) {
    const error = new ApiError(response.status, doc);
    if (response.status === 401) onUnauthorized(error);
    throw error;
  }
  return doc;
}

// Whether the current key (or none) is accepted: a cheap request every key must pass.
export async function checkKey() {
  const response = await fetch('/jobs?limit=1', { headers: headers({ Accept: 'application/json' }) });
  if (response.status === 401) return false;
  if (!response.ok) throw new ApiError(response.status, await response.json().catch(() => null));
  return true;
}

// Finished images never change (the server says so), so one blob URL per image is kept.
// Bounded: the oldest are let go past the limit (an <img> showing one keeps its pixels).
const imageCache = new Map();
const IMAGE_CACHE_SIZE = 300;

// A URL an <img> or a download link can use for `url`: the URL itself without a key, a blob
// URL fetched with the key otherwise.
export async function imageUrl(url) {
  if (!key) return url;
  if (imageCache.has(url)) return imageCache.get(url);
  const response = await fetch(url, { headers: headers() });
  if (!response.ok) {
    if (response.status === 401) onUnauthorized(new ApiError(401, null));
    throw new ApiError(response.status, null);
  }
  const blobUrl = URL.createObjectURL(await response.blob());
  imageCache.set(url, blobUrl);
  if (imageCache.size > IMAGE_CACHE_SIZE) {
    const [oldest, oldUrl] = imageCache.entries().next().value;
    imageCache.delete(oldest);
    URL.revokeObjectURL(oldUrl);
  }
  return blobUrl;
}

// Show image `url` in `img` (the alt text is the caller's).
export async function showImage(img, url) {
  try {
    img.src = await imageUrl(url);
  } catch {
    img.classList.add('broken');
  }
}

// The image's bytes, e.g. to reuse it as an upload.
export async function imageBlob(url) {
  const response = await fetch(url, { headers: headers() });
  if (!response.ok) throw new ApiError(response.status, null);
  return response.blob();
}

// The URL of an event stream: with a key, a stream token (valid for 60 s, enough to open it;
// the stream stays open after) instead of the key. `lastEventId` asks for what was missed.
export async function streamUrl(path, lastEventId) {
  const query = new URLSearchParams();
  if (key) query.set('token', (await request('POST', '/events/token')).token);
  if (lastEventId) query.set('lastEventId', lastEventId);
  const text = query.toString();
  return text ? `${path}?${text}` : path;
}
