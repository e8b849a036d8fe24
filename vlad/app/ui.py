"""The app's layout: Gradio components wired to the session functions of :mod:`vlad.app.session`.

Start it with ``vlad demo`` or ``python demo/app.py`` (options: ``--weights random|tiny`` without
pretrained weights, ``--detector``, ``--object``, ``--host``, ``--port``).
"""

from __future__ import annotations

import os

from vlad.app.session import (
    DEFAULT_SCORERS,
    DemoSession,
    add_references,
    add_unlabeled,
    apply_prompts,
    apply_thresholds,
    bootstrap_references,
    build_detector,
    default_prompt_text,
    inspect,
    live_scorers,
    load_prompt_file,
    maps_html,
    remove_reference,
    render,
    save_prompt_file,
    table_headers,
    text_to_prompts,
)


# -- the UI ------------------------------------------------------------------------------------------
def build_app(scorers: list[str] | None = None, object_name: str = "object", weights: str = "pretrained",
              device: str = "cpu"):
    """The Gradio Blocks app (not launched)."""
    import gradio as gr


    scorers = scorers or list(DEFAULT_SCORERS)
    normal0, anomalous0, templates0 = default_prompt_text(object_name)
    tiers = live_scorers()
    available = tiers["zero"] + tiers["unlabeled"] + tiers["few"]

    with gr.Blocks(title="vlad: zero- and few-shot inspection") as app:
        state = gr.State(None)
        gr.Markdown("## vlad · zero- and few-shot visual inspection\nName the product, upload images, "
                    "tune prompts by looking; add good images and the few-shot tier joins.")
        status = gr.Markdown("press **Build** to start", elem_id="status")
        with gr.Row():
            with gr.Column(scale=1):
                choose = gr.CheckboxGroup(available, value=[s for s in scorers if s in available], label="Scorers")
                obj = gr.Textbox(object_name, label="Object name", elem_id="object-name")
                with gr.Row():
                    weights_in = gr.Dropdown(["pretrained", "random", "tiny"], value=weights, label="Weights",
                                             allow_custom_value=True)
                    device_in = gr.Dropdown(["cpu", "cuda", "auto"], value=device, label="Device")
                build_btn = gr.Button("Build", variant="primary", elem_id="build")
                images_in = gr.File(file_count="multiple", file_types=["image"], label="Images to inspect",
                                    elem_id="images")
                inspect_btn = gr.Button("Inspect", variant="primary", elem_id="inspect")
                refs_in = gr.File(file_count="multiple", file_types=["image"], label="Good reference images",
                                  elem_id="refs")
                add_btn = gr.Button("Add references", elem_id="add-refs")
                refs_list = gr.Dropdown([], label="References", allow_custom_value=False)
                remove_btn = gr.Button("Remove selected reference")
                with gr.Accordion("Unlabeled pool (musc)", open=False):
                    pool_in = gr.File(file_count="multiple", file_types=["image"],
                                      label="Unlabeled images of the line", elem_id="pool")
                    pool_btn = gr.Button("Add to pool", elem_id="add-pool")
                    with gr.Row():
                        boot_n = gr.Number(4, precision=0, label="References to pick")
                        boot_btn = gr.Button("Pick most normal as references", elem_id="bootstrap")
                img_thr = gr.Slider(0, 1, value=0.5, step=0.01, label="Image threshold")
                pix_thr = gr.Slider(0, 1, value=0.5, step=0.01, label="Pixel threshold")
                with gr.Row():
                    thr_btn = gr.Button("Apply thresholds")
                    auto_btn = gr.Button("Derived thresholds")
            with gr.Column(scale=2):
                summary = gr.Markdown("", elem_id="summary")
                table = gr.Dataframe(headers=["image", "score", "label"], label="Scores", elem_id="scores",
                                     interactive=False)
                # plain HTML, not a Gallery: each map is shown whole at its image's aspect ratio, the image
                # beside it (a Gallery's grid crops every picture to its own tile shape)
                gr.Markdown("**Fused anomaly map** (image · map)")
                fused = gr.HTML(elem_id="fused-maps")
                with gr.Accordion("Each scorer's map", open=False):
                    parts = gr.HTML(elem_id="part-maps")
                with gr.Accordion("Prompts (WinCLIP)", open=True):
                    normal_in = gr.Textbox(normal0, lines=6, label="Normal states ({} = object)", elem_id="normal")
                    anomalous_in = gr.Textbox(anomalous0, lines=4, label="Anomalous states ({} = object)",
                                              elem_id="anomalous")
                    templates_in = gr.Textbox(templates0, lines=6, label="Templates ({} = state phrase)",
                                              elem_id="templates")
                    with gr.Row():
                        prompts_btn = gr.Button("Apply prompts", elem_id="apply-prompts")
                        prompt_file = gr.File(file_types=[".yaml", ".yml"], label="Load prompt YAML")
                        save_btn = gr.Button("Save prompts as YAML")
                    saved = gr.File(label="Saved prompts", interactive=False)

        def show(session):
            if session is None:
                return maps_html([]), maps_html([]), gr.update(value=[]), ""
            f, p, rows, text = render(session)
            images = [img.data if img.data.dtype.name == "uint8" else (img.pixels * 255).round().astype("uint8")
                      for img in session.images] if f else None
            return maps_html(f, images), maps_html(p), gr.update(value=rows, headers=table_headers(session)), text

        outputs = [fused, parts, table, summary]

        def on_build(chosen, name, w, dev, normal, anomalous, templates, progress=gr.Progress(track_tqdm=True)):
            prompts = text_to_prompts(normal, anomalous, templates)
            session, msg = build_detector(chosen, name, w, dev, prompts)
            return (session, msg, *show(session))

        def on_inspect(session, files, progress=gr.Progress(track_tqdm=True)):
            session, msg = inspect(session or DemoSession(), files)
            return (session, msg, *show(session))

        def on_prompts(session, name, normal, anomalous, templates, progress=gr.Progress(track_tqdm=True)):
            session, msg = apply_prompts(session or DemoSession(), name, normal, anomalous, templates)
            return (session, msg, *show(session))

        def on_add(session, files, progress=gr.Progress(track_tqdm=True)):
            session, refs, msg = add_references(session or DemoSession(), files)
            return (session, gr.update(choices=refs, value=None), msg, *show(session))

        def on_pool(session, files, progress=gr.Progress(track_tqdm=True)):
            session, msg = add_unlabeled(session or DemoSession(), files)
            return (session, msg, *show(session))

        def on_boot(session, n, progress=gr.Progress(track_tqdm=True)):
            session, refs, msg = bootstrap_references(session or DemoSession(), n)
            return (session, gr.update(choices=refs, value=None), msg, *show(session))

        def on_remove(session, name):
            session, refs, msg = remove_reference(session or DemoSession(), name)
            return (session, gr.update(choices=refs, value=None), msg, *show(session))

        def on_thresholds(session, i_thr, p_thr, auto=False):
            session, msg = apply_thresholds(session or DemoSession(), i_thr, p_thr, use_auto=auto)
            return (session, msg, *show(session))

        build_btn.click(on_build, [choose, obj, weights_in, device_in, normal_in, anomalous_in, templates_in],
                        [state, status, *outputs])
        inspect_btn.click(on_inspect, [state, images_in], [state, status, *outputs])
        prompts_btn.click(on_prompts, [state, obj, normal_in, anomalous_in, templates_in], [state, status, *outputs])
        add_btn.click(on_add, [state, refs_in], [state, refs_list, status, *outputs])
        remove_btn.click(on_remove, [state, refs_list], [state, refs_list, status, *outputs])
        pool_btn.click(on_pool, [state, pool_in], [state, status, *outputs])
        boot_btn.click(on_boot, [state, boot_n], [state, refs_list, status, *outputs])
        thr_btn.click(on_thresholds, [state, img_thr, pix_thr], [state, status, *outputs])
        auto_btn.click(lambda s: on_thresholds(s, None, None, True), [state], [state, status, *outputs])
        prompt_file.upload(load_prompt_file, [prompt_file], [normal_in, anomalous_in, templates_in, status])
        save_btn.click(lambda n, a, t: save_prompt_file(n, a, t), [normal_in, anomalous_in, templates_in],
                       [saved, status])
    return app


def launch(host: str = "127.0.0.1", port: int = 7860, detector: str | None = None, object_name: str | None = None,
           weights: str = "pretrained", device: str = "cpu", block: bool = True):
    """Build and start the app on ``host:port`` (loopback by default)."""
    os.environ.setdefault("VLAD_PROGRESS", "1")  # tqdm bars feed Gradio's progress display
    scorers = detector.split("+") if detector else None
    app = build_app(scorers, object_name or "object", weights, device)
    app.queue().launch(server_name=host, server_port=port, prevent_thread_lock=not block, show_error=False)
    return app
