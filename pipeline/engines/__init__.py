"""Sampling engines: one request type (`request.SamplingRequest`) and one settings mixin (`settings`), served by a
local vLLM engine process (`vllm_local`), vLLM replicas on Ray (`ray_replicas`) or an OpenAI-compatible server
(`openai_client`)."""
