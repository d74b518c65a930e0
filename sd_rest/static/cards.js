// A job as a card: what it is, where it stands (position, or image n of N with the step's
// progress), its images as they finish, and a cancel button while it is unfinished. A card is
// updated in place as events arrive, so its images are not reloaded and nothing flickers.

import { showImage } from './api.js';
import { isActive, jobs } from './jobs.js';
import { ENDPOINT_NAMES, h, jobTitle, percent, totalImages } from './util.js';

const STATUS_NAMES = {
  QUEUED: 'Waiting',
  IN_PROGRESS: 'Running',
  COMPLETE: 'Complete',
  FAILED: 'Failed',
  CANCELED: 'Canceled',
};

export class JobCard {
  // `open(job, index)`: show image `index` of the job large.
  constructor(job, open) {
    this.open = open;
    this.shown = new Set(); // image URLs already on the card
    this.title = h('h3', { class: 'card-title' });
    this.badge = h('span', { class: 'status' });
    this.line = h('p', { class: 'card-line' });
    this.stepBar = h('progress', { max: 1, value: 0 });
    this.allBar = h('progress', { max: 1, value: 0 });
    this.stepLabel = h('span');
    this.allLabel = h('span');
    this.allRow = h('label', { class: 'bar' }, this.allLabel, this.allBar);
    this.bars = h('div', { class: 'bars' },
      h('label', { class: 'bar' }, this.stepLabel, this.stepBar), this.allRow);
    this.thumbs = h('div', { class: 'thumbs' });
    this.cancelButton = h('button', { type: 'button', class: 'danger', onclick: () => this.cancel() }, 'Cancel');
    this.el = h('article', { class: 'card', dataset: { id: job.id } },
      h('div', { class: 'card-head' }, this.title, this.badge),
      this.line, this.bars, this.thumbs, h('div', { class: 'actions' }, this.cancelButton));
    this.update(job);
  }

  update(job) {
    this.job = job;
    const title = jobTitle(job);
    this.title.textContent = title;
    this.title.title = title;
    this.el.dataset.status = job.status || '';
    this.badge.textContent = STATUS_NAMES[job.status] || '';
    this.badge.dataset.status = job.status || '';
    this.line.textContent = `${ENDPOINT_NAMES[job.endpoint] || job.endpoint} · ${describe(job)}`;
    this.cancelButton.hidden = !isActive(job);
    this.cancelButton.setAttribute('aria-label', `Cancel ${title}`);
    this.updateBars(job);
    (job.imageUrls || []).forEach((url, index) => {
      if (this.shown.has(url)) return;
      this.shown.add(url);
      const img = h('img', { alt: `Image ${index + 1} of ${title}`, loading: 'lazy' });
      showImage(img, url);
      this.thumbs.append(h('button', {
        type: 'button', class: 'thumb', 'aria-label': `Open image ${index + 1}`,
        onclick: () => this.open(this.job, index),
      }, img));
    });
  }

  // Running: the current image's steps, and the whole job. Finished: full, or where it stopped.
  updateBars(job) {
    const total = totalImages(job);
    const progress = job.progress;
    const running = job.status === 'IN_PROGRESS' && progress;
    this.bars.hidden = !running && job.status !== 'COMPLETE';
    this.allRow.hidden = total < 2; // one image: the whole job is that image's bar
    if (running) {
      const batch = (job.params && job.params.batchSize) || 1;
      const index = progress.currentImageIndex;
      const done = Math.min(total, index - 1 + progress.currentImageProgress * batch);
      this.stepBar.value = progress.currentImageProgress;
      this.stepLabel.textContent = batch > 1
        ? `Images ${index}–${Math.min(total, index + batch - 1)} of ${total}: ${percent(progress.currentImageProgress)}`
        : `Image ${index} of ${total}: ${percent(progress.currentImageProgress)}`;
      this.allBar.value = done / total;
      this.allLabel.textContent = `Whole job: ${percent(done / total)}`;
    } else if (job.status === 'COMPLETE') {
      this.stepBar.value = 1;
      this.allBar.value = 1;
      this.stepLabel.textContent = `Image ${total} of ${total}: 100 %`;
      this.allLabel.textContent = 'Whole job: 100 %';
    }
  }

  async cancel() {
    this.cancelButton.disabled = true;
    try {
      await jobs.cancel(this.job);
    } catch {
      // The stream still tells how it ended; the button comes back if it did not.
    } finally {
      this.cancelButton.disabled = false;
    }
  }
}

function describe(job) {
  const total = totalImages(job);
  const images = `${total} image${total === 1 ? '' : 's'}`;
  switch (job.status) {
    case 'QUEUED':
      if (job.position === 0) return `${images}, starting: the model is loading`;
      return job.position ? `${images}, number ${job.position} in line` : `${images}, waiting`;
    case 'IN_PROGRESS':
      return `${images}, running`;
    case 'COMPLETE':
      return `${images}, done`;
    case 'FAILED':
      return `failed: ${job.error || 'the script failed'}`;
    case 'CANCELED': {
      const made = (job.imageUrls || []).length;
      return made ? `canceled, ${made} of ${total} images made` : 'canceled before its first image';
    }
    default:
      return images;
  }
}
