// Make: one form per endpoint, built from the server's field table (written into the page as
// it is served), so the labels' ranges and defaults are the ones validation uses.
//
// The forms do not validate in the browser (`novalidate`): the server is the one judge (it
// knows rules a browser cannot, such as the steps that crash the sampler), and its error is
// shown beside the field it names. Settings are remembered in localStorage as they change.

import { ApiError, imageBlob, request } from './api.js';
import { jobs } from './jobs.js';
import { MaskPainter } from './mask.js';
import {
  ENDPOINT_NAMES, FIELD_NAMES, PAGE_DATA as table, h, jobId, loadSaved, randomSeed, save,
} from './util.js';

// The order fields are shown in: what people change most first.
const ORDER = ['prompt', 'image', 'mask', 'strength', 'width', 'height', 'steps',
  'guidanceScale', 'seed', 'iterations', 'batchSize', 'eta', 'plms'];
const STEP = { guidanceScale: '0.5', eta: '0.05', strength: '0.05' };
const SIZE_MULTIPLES = { 'image-to-image': 64, 'inpaint-image': 32 }; // the server's crops
const BRUSH_DEFAULT = 40;

const forms = {}; // endpoint -> EndpointForm
let onJob = () => {};

// `root`: where the forms go; `picker`: the fieldset of endpoint choices; `submitted(job)` is
// told of every job posted.
export function setupMake(picker, root, submitted) {
  onJob = submitted;
  for (const endpoint of Object.keys(table.endpoints)) {
    forms[endpoint] = new EndpointForm(endpoint);
    root.append(forms[endpoint].form);
    const radio = h('input', {
      type: 'radio', name: 'endpoint', value: endpoint, id: `pick-${endpoint}`,
      onchange: () => choose(endpoint),
    });
    picker.append(h('span', { class: 'pick' }, radio,
      h('label', { for: `pick-${endpoint}` }, ENDPOINT_NAMES[endpoint])));
  }
  const saved = loadSaved('endpoint');
  choose(saved in forms ? saved : Object.keys(forms)[0]);
}

function choose(endpoint) {
  for (const [name, entry] of Object.entries(forms)) entry.form.hidden = name !== endpoint;
  document.getElementById(`pick-${endpoint}`).checked = true;
  save('endpoint', endpoint);
}

// "Use these settings" and "Same settings, new seed": fill the endpoint's form with a job's
// parameters and show it, the Make button focused. Uploads are not served back by the server,
// so an image-to-image or inpaint form keeps the image it has (or asks for one).
export function useSettings(endpoint, params, { newSeed = false } = {}) {
  const entry = forms[endpoint];
  if (!entry) return;
  choose(endpoint);
  entry.apply(params);
  if (newSeed && entry.inputs.seed) entry.inputs.seed.value = randomSeed();
  entry.remember();
  const needsUpload = entry.files.length > 0 && !entry.image;
  entry.say(needsUpload
    ? `Settings filled in. Choose the ${endpoint === 'inpaint-image' ? 'image and paint its mask' : 'input image'} again: the server does not hand uploads back.`
    : 'Settings filled in: press Make.');
  entry.submit.focus();
}

// "Use as input image": a finished image becomes the upload of the image-to-image form.
export async function useAsInput(url) {
  const entry = forms['image-to-image'];
  choose('image-to-image');
  const blob = await imageBlob(url);
  const [id, n] = url.split('/').slice(-2);
  await entry.setImage(new File([blob], `sd-rest-${id.slice(0, 8)}-${n}`, { type: 'image/png' }));
  entry.say('Image set as the input: press Make.');
  entry.submit.focus();
}

// A 0/1 field shown as a checkbox; its `value` reads and takes "1" and "0" like the number
// inputs', so saving, restoring, reusing a job's settings and sending need no special case.
function switchInput(id, name, describedBy) {
  const box = h('input', { id, name, type: 'checkbox', 'aria-describedby': describedBy });
  Object.defineProperty(box, 'value', {
    get() { return box.checked ? '1' : '0'; },
    set(value) { box.checked = Number(value) === 1; },
  });
  return box;
}

class EndpointForm {
  constructor(endpoint) {
    this.endpoint = endpoint;
    this.spec = table.endpoints[endpoint];
    this.files = this.spec.files;
    this.inputs = {}; // field name -> its control
    this.errors = {}; // field name -> its error element
    this.image = null; // the chosen upload (a File)
    this.form = h('form', {
      class: 'job-form', id: `form-${endpoint}`, novalidate: true,
      'aria-label': ENDPOINT_NAMES[endpoint], onsubmit: (e) => this.send(e),
    });
    const names = [...Object.keys(this.spec.defaults), ...this.files];
    names.sort((a, b) => ORDER.indexOf(a) - ORDER.indexOf(b));
    const grid = h('div', { class: 'grid' });
    for (const name of names) {
      const row = this.row(name);
      if (table.fields[name].kind === 'int' || table.fields[name].kind === 'float') grid.append(row);
      else this.form.append(row);
    }
    this.form.append(grid);
    this.randomEach = h('input', { type: 'checkbox', id: `${endpoint}-random-seed` });
    this.randomEach.checked = Boolean(loadSaved(`random-seed:${endpoint}`, false));
    this.randomEach.addEventListener('change', () => save(`random-seed:${endpoint}`, this.randomEach.checked));
    this.submit = h('button', { type: 'submit', class: 'primary' }, 'Make');
    this.status = h('p', { class: 'form-status', role: 'status', id: `${endpoint}-status` });
    this.formError = h('p', { class: 'error', role: 'alert', id: `${endpoint}-form-error` });
    this.form.append(
      h('label', { class: 'check' }, this.randomEach, ' New random seed for every job'),
      h('div', { class: 'actions' }, this.submit,
        h('button', { type: 'button', onclick: () => this.reset() }, 'Reset to defaults')),
      this.formError, this.status,
    );
    this.restore();
    this.form.addEventListener('input', () => this.remember());
  }

  // One field: label, control, the range and default, and a place for the server's error.
  row(name) {
    const field = table.fields[name];
    const id = `${this.endpoint}-${name}`;
    const hint = h('p', { class: 'hint', id: `${id}-hint` }, this.hint(name));
    const error = h('p', { class: 'error', id: `${id}-error` });
    this.errors[name] = error;
    const describedBy = `${id}-hint ${id}-error`;
    let control;
    if (field.kind === 'file') return this.fileRow(name, id, hint, error);
    if (field.kind === 'text') {
      control = h('textarea', {
        id, name, rows: 3, maxlength: field.maxLength, 'aria-describedby': describedBy,
        placeholder: 'A lighthouse on a cliff at dusk, oil painting',
      });
    } else if (name === 'plms') {
      control = switchInput(id, name, describedBy);
    } else {
      control = h('input', {
        id, name, type: 'number', min: this.low(name), max: this.high(name),
        step: field.multiple > 1 ? field.multiple : STEP[name] || (field.kind === 'int' ? 1 : 'any'),
        inputmode: field.kind === 'int' ? 'numeric' : 'decimal', 'aria-describedby': describedBy,
      });
    }
    this.inputs[name] = control;
    const label = h('label', { for: id }, FIELD_NAMES[name] || name);
    if (name === 'seed') {
      const dice = h('button', {
        type: 'button', 'aria-label': 'Random seed',
        onclick: () => { control.value = randomSeed(); this.remember(); },
      }, 'Random');
      return h('div', { class: 'field field-seed' }, label, h('div', { class: 'with-button' }, control, dice), hint, error);
    }
    return h('div', { class: `field field-${name}` }, label, control, hint, error);
  }

  low(name) {
    const field = table.fields[name];
    return field.openInterval ? Number(STEP[name] || 0.01) : field.low;
  }

  high(name) {
    const field = table.fields[name];
    return field.openInterval ? field.high - Number(STEP[name] || 0.01) : field.high;
  }

  hint(name) {
    const field = table.fields[name];
    const fallback = this.spec.defaults[name];
    const dflt = fallback === null || fallback === undefined ? 'required' : `default ${fallback}`;
    if (field.kind === 'text') return `Up to ${field.maxLength} characters; ${dflt}.`;
    if (field.kind === 'file') {
      return name === 'mask'
        ? 'Paint over what to repaint (white in the mask sent), or load a mask file.'
        : `PNG, JPEG or WebP; cropped to multiples of ${SIZE_MULTIPLES[this.endpoint]} pixels.`;
    }
    if (name === 'plms') return "txt2img.py's --plms instead of DDIM; eta must then be 0.";
    const range = field.openInterval
      ? `between ${field.low} and ${field.high}, both excluded`
      : `${field.low}–${field.high}`;
    const multiple = field.multiple > 1 ? `, a multiple of ${field.multiple}` : '';
    return `${range}${multiple}; ${dflt}.`;
  }

  fileRow(name, id, hint, error) {
    const describedBy = `${id}-hint ${id}-error`;
    if (name === 'image') {
      const input = h('input', {
        id, name, type: 'file', accept: 'image/png,image/jpeg,image/webp', 'aria-describedby': describedBy,
        onchange: () => input.files[0] && this.setImage(input.files[0]),
      });
      this.fileInput = input;
      this.preview = h('img', { class: 'preview', alt: 'The chosen image', hidden: true });
      this.previewNote = h('p', { class: 'hint', id: `${id}-size`, 'aria-live': 'polite' });
      if (this.endpoint === 'inpaint-image') {
        // The image is shown under the mask canvas instead (see the mask row).
        return h('div', { class: 'field' }, h('label', { for: id }, 'Image'), input, hint, this.previewNote, error);
      }
      return h('div', { class: 'field' }, h('label', { for: id }, 'Image'), input, hint,
        h('figure', { class: 'preview-box' }, this.preview), this.previewNote, error);
    }
    // The mask: painted on a canvas over the image, or loaded from a file.
    const canvas = h('canvas', {
      id, class: 'mask-canvas', role: 'img', 'aria-describedby': describedBy,
      'aria-label': 'Mask: paint over the part of the image to repaint',
    });
    const brush = h('input', {
      type: 'range', id: `${id}-brush`, min: 4, max: 160, value: loadSaved('brush', BRUSH_DEFAULT),
      onchange: () => save('brush', Number(brush.value)),
    });
    const brushValue = h('output', { for: `${id}-brush`, id: `${id}-brush-value` }, brush.value);
    brush.addEventListener('input', () => { brushValue.textContent = brush.value; });
    this.painter = new MaskPainter(canvas, brush);
    this.painter.onchange = () => { this.clearErrors(); };
    const file = h('input', {
      type: 'file', id: `${id}-file`, accept: 'image/png,image/jpeg,image/webp',
      onchange: async () => {
        if (file.files[0] && this.image) await this.painter.load(file.files[0]);
        file.value = '';
      },
    });
    this.paintArea = h('div', { class: 'paint', hidden: true }, this.preview, canvas);
    this.paintEmpty = h('p', { class: 'empty' }, 'Choose an image above, then paint the mask on it.');
    this.maskTools = h('div', { class: 'mask-tools', hidden: true },
      h('span', { class: 'brush' }, h('label', { for: `${id}-brush` }, 'Brush size'), brush, brushValue),
      h('button', { type: 'button', onclick: () => this.painter.clear() }, 'Clear mask'),
      h('span', { class: 'mask-file' }, h('label', { for: `${id}-file` }, 'Or load a mask file'), file),
    );
    return h('div', { class: 'field' }, h('span', { class: 'label', id: `${id}-label` }, 'Mask'),
      hint, this.paintEmpty, this.paintArea, this.maskTools, error);
  }

  // An image chosen (or reused): show it, with the size the server will crop it to.
  async setImage(file) {
    this.image = file;
    if (this.fileInput.files[0] !== file) {
      const transfer = new DataTransfer();
      transfer.items.add(file);
      this.fileInput.files = transfer.files;
    }
    this.clearErrors();
    if (this.previewUrl) URL.revokeObjectURL(this.previewUrl);
    this.previewUrl = URL.createObjectURL(file);
    const img = this.preview;
    img.hidden = false;
    await new Promise((resolve) => {
      img.onload = resolve;
      img.onerror = resolve;
      img.src = this.previewUrl;
    });
    const { naturalWidth: w, naturalHeight: h2 } = img;
    if (!w) {
      this.previewNote.textContent = 'This file cannot be shown as an image.';
      return;
    }
    const m = SIZE_MULTIPLES[this.endpoint];
    const cw = w - (w % m);
    const ch = h2 - (h2 % m);
    this.previewNote.textContent = cw === w && ch === h2
      ? `${w} × ${h2} pixels.` : `${w} × ${h2} pixels, cropped to ${cw} × ${ch} by the server.`;
    if (this.painter) {
      this.painter.reset(w, h2);
      this.paintArea.hidden = false;
      this.maskTools.hidden = false;
      this.paintEmpty.hidden = true;
    }
  }

  restore() {
    this.apply(this.spec.defaults);
    this.apply(loadSaved(`settings:${this.endpoint}`, {}));
  }

  apply(values) {
    for (const [name, value] of Object.entries(values || {})) {
      const input = this.inputs[name];
      if (input && value !== null && value !== undefined) input.value = value;
    }
    this.clearErrors();
  }

  reset() {
    this.apply(this.spec.defaults);
    if (this.inputs.prompt) this.inputs.prompt.value = '';
    this.remember();
    this.say('Back to the defaults.');
  }

  remember() {
    const values = {};
    for (const [name, input] of Object.entries(this.inputs)) values[name] = input.value;
    save(`settings:${this.endpoint}`, values);
  }

  say(text) {
    this.status.textContent = text;
  }

  clearErrors() {
    for (const [name, el] of Object.entries(this.errors)) {
      el.textContent = '';
      const control = this.inputs[name] || (name === 'image' ? this.fileInput : null);
      if (control) control.removeAttribute('aria-invalid');
    }
    this.formError.textContent = '';
  }

  // The server's (or the page's own) error: beside its field, the field focused; or above the
  // status line when it names no field of this form.
  showError(message, field) {
    const el = field && this.errors[field];
    if (!el) {
      this.formError.textContent = message;
      return;
    }
    el.textContent = message;
    const control = this.inputs[field] || (field === 'image' ? this.fileInput : this.painter?.canvas);
    if (control) {
      control.setAttribute('aria-invalid', 'true');
      if (control.focus) control.focus();
      control.scrollIntoView({ block: 'nearest' }); // at once: a smooth scroll moves what is being painted
    }
  }

  async send(event) {
    event.preventDefault();
    this.clearErrors();
    if (this.painter && this.image && !this.painter.painted) {
      this.showError('Paint over the part of the image to repaint first.', 'mask');
      return;
    }
    // What is not a number reads as empty, which would quietly send nothing: say so instead.
    for (const [name, input] of Object.entries(this.inputs)) {
      if (input.validity && input.validity.badInput) {
        this.showError(`${FIELD_NAMES[name] || name} must be a number.`, name);
        return;
      }
    }
    if (this.randomEach.checked && this.inputs.seed) this.inputs.seed.value = randomSeed();
    this.remember();
    const body = new FormData();
    const params = {};
    for (const [name, input] of Object.entries(this.inputs)) {
      const value = input.value.trim();
      // An empty number takes the server's default; an empty prompt is the server's to refuse.
      if (value === '' && name !== 'prompt') continue;
      body.append(name, name === 'prompt' ? input.value : value);
      params[name] = table.fields[name].kind === 'text' ? input.value : Number(value);
    }
    if (this.image) body.append('image', this.image, this.image.name || 'image.png');
    if (this.painter && this.image) body.append('mask', await this.painter.toBlob(), 'mask.png');
    this.submit.disabled = true;
    this.say('Sending…');
    const mark = jobs.seq;
    try {
      const doc = await request('POST', `/${this.endpoint}`, body);
      const id = jobId(doc.resultUrl);
      // A new job (or one posted again) is announced on the stream; a job these settings had
      // already made is not, and the answer says COMPLETE.
      const madeBefore = doc.status === 'COMPLETE' && !((jobs.heard.get(id) || 0) > mark);
      const job = jobs.posted(id, doc, {
        endpoint: this.endpoint, params: { ...this.spec.defaults, ...params },
      }, mark);
      this.say(madeBefore
        ? 'These exact settings were made before: that job is shown under Latest. Change the seed for a new image.'
        : 'Sent: its progress shows under Latest.');
      onJob(job);
    } catch (error) {
      this.say('');
      if (error instanceof ApiError) this.showError(error.message, error.field);
      else this.showError('The server could not be reached. Is it running?', null);
    } finally {
      this.submit.disabled = false;
    }
  }
}


