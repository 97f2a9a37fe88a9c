#include "launcher/train_config.h"

#include <toml++/toml.h>

#include <cstdlib>
#include <fstream>
#include <limits>
#include <map>
#include <sstream>
#include <variant>

#include "tessera/comm/fault.h"
#include "tessera/core/config.h"

namespace tessera::launcher {
namespace {

// Where a key's value goes; the pointer's type is the key's type.
using Target = std::variant<int64_t*, int*, uint64_t*, double*, bool*, std::string*, std::vector<int64_t>*,
                            std::vector<double>*>;
struct Field {
  std::string key;
  Target target;
};
// Dotted section name ("optim", "model.moe") -> its keys, in documentation order.
using Schema = std::map<std::string, std::vector<Field>>;

const char* const kSectionNames =
    "model, data, optim, diloco, demo, mt_dao, train, parallel, pipeline, precision, elastic, faults";

// The keys of every section, pointing into `c`. [model] lists the keys of c.model.kind only.
Schema schemaOf(TrainJobConfig& c) {
  Schema s;
  auto& g = c.model.gpt;
  auto& m = c.model.mlp;
  if (c.model.kind == "mlp") {
    s["model"] = {{"kind", &c.model.kind}, {"input_dim", &m.input_dim}, {"hidden_sizes", &m.hidden_sizes},
                  {"num_classes", &m.num_classes}, {"dropout", &m.dropout}, {"seed", &m.seed},
                  {"init_from", &c.model.init_from}};
  } else {
    s["model"] = {{"kind", &c.model.kind},   {"vocab_size", &g.vocab_size}, {"block_size", &g.block_size},
                  {"n_layer", &g.n_layer},    {"n_head", &g.n_head},         {"d_model", &g.d_model},
                  {"mlp_ratio", &g.mlp_ratio}, {"positions", &g.positions},  {"rope_base", &g.rope_base},
                  {"tie_weights", &g.tie_weights}, {"dropout", &g.dropout}, {"init_std", &g.init_std},
                  {"seed", &g.seed},          {"use_moe", &g.use_moe}, {"init_from", &c.model.init_from}};
    s["model.moe"] = {{"num_experts", &g.moe.num_experts}, {"top_k", &g.moe.top_k},
                      {"capacity_factor", &g.moe.capacity_factor}, {"aux_loss_weight", &g.moe.aux_loss_weight}};
  }
  auto& d = c.data;
  s["data"] = {{"dataset", &d.dataset}, {"dir", &d.dir},          {"seq_len", &d.seq_len}, {"val_fraction", &d.val_fraction},
               {"normalize", &d.normalize}, {"batch_size", &d.batch_size}, {"seed", &d.seed}, {"shuffle", &d.shuffle}};
  auto& o = c.optim;
  auto& l = c.schedule;
  s["optim"] = {{"name", &c.optimizer},    {"lr", &l.lr},
                {"min_lr", &l.min_lr},     {"schedule", &l.schedule},
                {"warmup_steps", &l.warmup_steps}, {"decay_fraction", &l.decay_fraction},
                {"beta1", &o.beta1},       {"beta2", &o.beta2},
                {"eps", &o.eps},           {"weight_decay", &o.weight_decay},
                {"momentum", &o.momentum}, {"nesterov", &o.nesterov}};
  auto& dl = c.diloco;
  s["diloco"] = {{"inner", &c.diloco_inner},     {"inner_steps", &dl.inner_steps}, {"outer_lr", &dl.outer_lr},
                 {"outer_momentum", &dl.outer_momentum}, {"nesterov", &dl.nesterov}, {"compression", &dl.compression},
                 {"fragments", &dl.fragments},   {"delay", &dl.delay},             {"mixing", &dl.mixing}};
  auto& dm = c.demo;
  s["demo"] = {{"compression_decay", &dm.compression_decay}, {"compression_topk", &dm.compression_topk},
               {"compression_chunk", &dm.compression_chunk}, {"weight_decay", &dm.weight_decay}};
  auto& mt = c.mt_dao;
  s["mt_dao"] = {{"form", &mt.form},   {"betas", &mt.betas},     {"nus", &mt.nus},
                 {"beta2", &mt.beta2}, {"eps", &mt.eps},         {"weight_decay", &mt.weight_decay},
                 {"sync_params", &mt.sync_params}, {"sync_momenta", &mt.sync_momenta}, {"sync_second", &mt.sync_second}};
  auto& t = c.train;
  s["train"] = {{"steps", &t.steps},           {"grad_accum", &t.grad_accum}, {"clip", &t.clip},
                {"eval_every", &t.eval_every}, {"eval_batches", &t.eval_batches}, {"log_every", &t.log_every},
                {"seed", &t.seed},             {"threads", &t.threads},       {"progress", &t.progress},
                {"post_validation", &t.post_validation}, {"device", &t.device}};
  auto& p = c.parallel;
  s["parallel"] = {{"dp_replicate", &p.mesh.dp_replicate}, {"dp_shard", &p.mesh.dp_shard}, {"tp", &p.mesh.tp},
                   {"pp", &p.mesh.pp},     {"ep", &p.mesh.ep},           {"strategy", &p.strategy},
                   {"bucket_mb", &p.bucket_mb}, {"backend", &p.backend}, {"sequence_parallel", &p.sequence_parallel},
                   {"moe_dtd", &p.moe_dtd}, {"grad_comm", &p.grad_comm}};
  auto& pr = c.parallel.precision;
  s["precision"] = {{"mode", &pr.mode},           {"level", &pr.level}, {"fp8_recipe", &pr.fp8_recipe},
                    {"amax_history", &pr.amax_history}, {"margin", &pr.margin},
                    {"fp8_comm_scaling", &pr.fp8_comm_scaling}};
  auto& pl = c.parallel.pipeline;
  s["pipeline"] = {{"schedule", &pl.schedule},         {"microbatches", &pl.microbatches},
                   {"virtual_stages", &pl.virtual_stages}, {"layers_per_stage", &pl.layers_per_stage},
                   {"auto_profile_steps", &pl.auto_profile_steps}, {"offload", &pl.offload},
                   {"offload_budget_mb", &pl.offload_budget_mb}, {"measure_activations", &pl.measure_activations}};
  auto& e = c.elastic;
  s["elastic"] = {{"heartbeat_interval_s", &e.heartbeat_interval_s}, {"heartbeat_timeout_s", &e.heartbeat_timeout_s},
                  {"min_nodes", &e.min_nodes},       {"max_nodes", &e.max_nodes},
                  {"wait_timeout_s", &e.wait_timeout_s}, {"collective_timeout_s", &e.collective_timeout_s},
                  {"max_retries", &e.max_retries},   {"join_timeout_s", &e.join_timeout_s},
                  {"start_grace_s", &e.start_grace_s},
                  // The store; tessera-run's TESSERA_RDZV_* variables win over these.
                  {"rdzv_backend", &e.rdzv_backend}, {"rdzv_endpoint", &e.rdzv_endpoint},
                  {"rdzv_id", &e.rdzv_id},           {"store_outage_timeout_s", &e.store_outage_timeout_s}};
  s["faults"] = {{"plan", &c.fault_plan}};
  return s;
}

std::string typeName(const toml::node& node) {
  switch (node.type()) {
    case toml::node_type::string: return "a string";
    case toml::node_type::integer: return "an integer";
    case toml::node_type::floating_point: return "a float";
    case toml::node_type::boolean: return "a boolean";
    case toml::node_type::array: return "an array";
    case toml::node_type::table: return "a table";
    default: return "a date/time";
  }
}

[[noreturn]] void wrongType(const std::string& key, const char* expected, const toml::node& node) {
  throw ConfigError(key, std::string("expected ") + expected + ", got " + typeName(node));
}

int64_t integerOf(const toml::node& node, const std::string& key, int64_t lo, int64_t hi) {
  if (!node.is_integer()) wrongType(key, "an integer", node);
  const int64_t v = *node.value<int64_t>();
  TESSERA_CHECK_CONFIG(v >= lo && v <= hi, key, "must be in [" << lo << ", " << hi << "], got " << v);
  return v;
}

// Stores `node` into `target`, checking its TOML type.
void assign(const toml::node& node, const Target& target, const std::string& key) {
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max();
  if (auto* p = std::get_if<int64_t*>(&target)) {
    **p = integerOf(node, key, std::numeric_limits<int64_t>::min(), kMax);
  } else if (auto* p = std::get_if<int*>(&target)) {
    **p = static_cast<int>(integerOf(node, key, std::numeric_limits<int>::min(), std::numeric_limits<int>::max()));
  } else if (auto* p = std::get_if<uint64_t*>(&target)) {
    **p = static_cast<uint64_t>(integerOf(node, key, 0, kMax));
  } else if (auto* p = std::get_if<double*>(&target)) {
    if (node.is_integer()) {
      **p = static_cast<double>(*node.value<int64_t>());
    } else if (node.is_floating_point()) {
      **p = *node.value<double>();
    } else {
      wrongType(key, "a number", node);
    }
  } else if (auto* p = std::get_if<bool*>(&target)) {
    if (!node.is_boolean()) wrongType(key, "a boolean (true or false)", node);
    **p = *node.value<bool>();
  } else if (auto* p = std::get_if<std::string*>(&target)) {
    if (!node.is_string()) wrongType(key, "a string", node);
    **p = *node.value<std::string>();
  } else if (auto* p = std::get_if<std::vector<int64_t>*>(&target)) {
    if (!node.is_array()) wrongType(key, "an array of integers", node);
    std::vector<int64_t> values;
    for (const toml::node& item : *node.as_array()) values.push_back(integerOf(item, key, 0, kMax));
    **p = std::move(values);
  } else if (auto* p = std::get_if<std::vector<double>*>(&target)) {
    if (!node.is_array()) wrongType(key, "an array of numbers", node);
    std::vector<double> values;
    for (const toml::node& item : *node.as_array()) {
      if (item.is_integer()) {
        values.push_back(static_cast<double>(*item.value<int64_t>()));
      } else if (item.is_floating_point()) {
        values.push_back(*item.value<double>());
      } else {
        wrongType(key, "an array of numbers", item);
      }
    }
    **p = std::move(values);
  }
}

std::string validKeys(const Schema& schema, const std::string& section) {
  std::string out;
  for (const Field& f : schema.at(section)) out += (out.empty() ? "" : ", ") + f.key;
  for (const auto& [name, fields] : schema) {
    if (name.rfind(section + ".", 0) == 0) out += ", " + name.substr(section.size() + 1) + ".*";
  }
  return out;
}

// Applies `node` to section.key of `config`, recursing into sub-tables ([model.moe]).
void applyKey(TrainJobConfig& config, const std::string& section, const std::string& key, const toml::node& node) {
  const Schema schema = schemaOf(config);
  const std::string dotted = section + "." + key;
  if (schema.count(dotted)) {
    const toml::table* table = node.as_table();
    if (!table) wrongType(dotted, "a table", node);
    for (const auto& [k, v] : *table) applyKey(config, dotted, std::string(k.str()), v);
    return;
  }
  if (dotted == "model.kind") return;  // read first (it decides the schema); checked there
  for (const Field& f : schema.at(section)) {
    if (f.key == key) return assign(node, f.target, dotted);
  }
  std::string valid = "valid: " + validKeys(schema, section);
  if (section.rfind("model", 0) == 0) valid += "; for model.kind = \"" + config.model.kind + "\"";
  throw ConfigError(dotted, "unknown key (" + valid + ")");
}

void applySection(TrainJobConfig& config, const std::string& section, const toml::node& node) {
  const Schema schema = schemaOf(config);
  if (section.find('.') != std::string::npos || !schema.count(section)) {
    throw ConfigError(section, std::string("unknown section (valid: ") + kSectionNames + ")");
  }
  const toml::table* table = node.as_table();
  if (!table) wrongType(section, "a table", node);
  for (const auto& [k, v] : *table) applyKey(config, section, std::string(k.str()), v);
}

toml::table parseToml(const std::string& text, const std::string& sourceName) {
  try {
    return toml::parse(text, sourceName);
  } catch (const toml::parse_error& e) {
    std::ostringstream out;
    out << sourceName << ":" << e.source().begin.line << ":" << e.source().begin.column << ": " << e.description();
    throw InvalidArgument(out.str());
  }
}

struct Override {
  std::string section;  // "optim", "model.moe"
  std::string key;      // "lr"
  toml::table value;    // {"v": the value}
};

// "optim.lr=1e-3" -> {optim, lr, 1e-3}. The value is parsed as TOML; text
// that is not TOML is taken as a string, so `--set optim.name=sgd` works.
Override parseOverride(const std::string& text) {
  const auto eq = text.find('=');
  const std::string path = text.substr(0, eq);
  const auto dot = path.rfind('.');
  TESSERA_CHECK_ARG(eq != std::string::npos && dot != std::string::npos && dot > 0 && dot + 1 < path.size(),
                    "--set '" << text << "': expected section.key=value, e.g. --set optim.lr=1e-3");
  Override o{path.substr(0, dot), path.substr(dot + 1), {}};
  const std::string value = text.substr(eq + 1);
  try {
    o.value = toml::parse("v = " + value);
  } catch (const toml::parse_error&) {
    o.value.insert_or_assign("v", value);
  }
  return o;
}

// The checks of parallel.tp against the other sections, before any process
// builds a mesh: the same conditions GptImpl::applyTensorParallel enforces at
// parallelize() time (heads, MoE, vocabulary), plus the sequence length that
// sequence parallelism splits, each naming the key to change and both numbers.
void validateTensorParallel(const TrainJobConfig& c) {
  const int64_t tp = c.parallel.mesh.tp;
  if (tp <= 1) return;  // tp < 1 is MeshShape::validate's error; sequence_parallel has no effect at tp = 1
  TESSERA_CHECK_CONFIG(c.model.kind == "gpt", "parallel.tp",
                       "tensor parallelism splits GPT layers; model.kind = \"" << c.model.kind
                           << "\" runs with parallel.tp = 1, got " << tp);
  c.model.gpt.validateTensorParallel(tp, "model.", "parallel.tp");
  if (c.parallel.sequence_parallel) {
    TESSERA_CHECK_CONFIG(c.data.seq_len % tp == 0, "data.seq_len",
                         "sequence parallelism splits the sequence over tp ranks: data.seq_len (" << c.data.seq_len
                             << ") must be divisible by parallel.tp (" << tp << ")");
  }
}

// The checks of parallel.pp against the other sections (PipelineConfig's own
// keys are ParallelConfig::validate's): a GPT, a batch that
// splits into the micro-batches, blocks enough for the chunks.
void validatePipeline(const TrainJobConfig& c) {
  const int pp = c.parallel.mesh.pp;
  if (pp <= 1) return;
  TESSERA_CHECK_CONFIG(c.model.kind == "gpt", "parallel.pp",
                       "pipeline stages cut GPT blocks; model.kind = \"" << c.model.kind
                           << "\" runs with parallel.pp = 1, got " << pp);
  const auto& pipeline = c.parallel.pipeline;
  pipeline.validate(pp);
  const int M = pipeline.microBatchesFor(pp);
  TESSERA_CHECK_CONFIG(c.data.batch_size % M == 0, "pipeline.microbatches",
                       "data.batch_size (" << c.data.batch_size << ") must split into " << M
                                           << " equal micro-batches (choose a divisor of the batch size)");
  models::gptChunkBlocks(c.model.gpt.n_layer, pp * pipeline.chunksPerRank(), pipeline.layers_per_stage);
}

// The checks of parallel.ep and parallel.moe_dtd against the model (the
// strategy against ep is ParallelConfig::resolve's).
void validateExpertParallel(const TrainJobConfig& c) {
  const int ep = c.parallel.mesh.ep;
  if (ep > 1) {
    TESSERA_CHECK_CONFIG(c.model.kind == "gpt" && c.model.gpt.use_moe, "parallel.ep",
                         "expert parallelism splits the experts of a mixture-of-experts GPT; set model.use_moe = "
                         "true (model.kind = \"gpt\") or parallel.ep = 1, got parallel.ep = "
                             << ep);
    const int64_t E = c.model.gpt.moe.num_experts;
    TESSERA_CHECK_CONFIG(E % ep == 0, "model.moe.num_experts",
                         "model.moe.num_experts (" << E << ") must be divisible by parallel.ep (" << ep
                                                   << "): every ep rank holds the same number of experts");
  }
  if (c.parallel.moe_dtd) {
    TESSERA_CHECK_CONFIG(c.model.kind == "gpt" && c.model.gpt.use_moe, "parallel.moe_dtd",
                         "duplicate-token dropping applies to mixture-of-experts layers; set model.use_moe = true "
                         "or parallel.moe_dtd = false");
    TESSERA_CHECK_CONFIG(c.parallel.mesh.tp > 1, "parallel.moe_dtd",
                         "duplicate-token dropping splits the experts' slots over tp; it needs parallel.tp > 1, got "
                             << c.parallel.mesh.tp << " (or set parallel.moe_dtd = false)");
  }
}

}  // namespace

void TrainJobConfig::validate() const {
  TESSERA_CHECK_CONFIG(model.kind == "gpt" || model.kind == "mlp", "model.kind",
                       "got '" << model.kind << "' (valid: gpt, mlp)");
  if (model.kind == "gpt") {
    model.gpt.validate("model.");
    TESSERA_CHECK_CONFIG(data.dataset == "fortunes", "data.dataset",
                         "model.kind = \"gpt\" trains on \"fortunes\", got \"" << data.dataset << "\"");
    TESSERA_CHECK_CONFIG(data.seq_len <= model.gpt.block_size, "data.seq_len",
                         "must be <= model.block_size (" << model.gpt.block_size << "), got " << data.seq_len);
  } else {
    model.mlp.validate("model.");
    TESSERA_CHECK_CONFIG(data.dataset == "fashion-mnist", "data.dataset",
                         "model.kind = \"mlp\" trains on \"fashion-mnist\", got \"" << data.dataset << "\"");
  }
  TESSERA_CHECK_CONFIG(model.kind == "gpt" || (parallel.strategy != "fsdp" && parallel.strategy != "hybrid"),
                       "parallel.strategy", "\"" << parallel.strategy << "\" shards GPT blocks; model.kind = \""
                                                  << model.kind << "\" supports none, ddp");
  validateTensorParallel(*this);
  validatePipeline(*this);
  validateExpertParallel(*this);
  TESSERA_CHECK_CONFIG(optimizer == "adamw" || optimizer == "sgd" || localUpdates(), "optim.name",
                       "got '" << optimizer << "' (valid: adamw, sgd, diloco, demo, mt-dao)");
  parallel::resolvePrecision(parallel.precision, parallel.grad_comm, parallel.strategy, steppingOptimizer());
  if (optimizer == "diloco") {
    TESSERA_CHECK_CONFIG(diloco_inner == "adamw" || diloco_inner == "sgd", "diloco.inner",
                         "got '" << diloco_inner << "' (valid: adamw, sgd)");
    diloco.validate("diloco.");
  }
  if (optimizer == "demo") {
    demo.validate("demo.");
    TESSERA_CHECK_CONFIG(parallel.strategy != "fsdp", "parallel.strategy",
                         "DeMo compresses 1-D/2-D tensors (whole parameters, or tensor-parallel shards chunked "
                         "on the logical tensor); \"fsdp\" flattens them into flat shards (valid: none, ddp)");
  }
  if (optimizer == "mt-dao") mt_dao.validate("mt_dao.");
  elastic.validate("elastic.");
  if (!fault_plan.empty()) {
    try {
      comm::FaultPlan::parse(fault_plan);
    } catch (const InvalidArgument& e) {
      throw ConfigError("faults.plan", e.what());
    }
  }
  data.validate();
  optim.validate("optim.");
  schedule.validate("optim.");
  train.validate("train.");
  // What runs on the device (and backend "nccl" only there): one check, shared with parallelize().
  parallel.validateDevice(parseDeviceSpec(train.device, "train.device").cuda, localUpdates(), steppingOptimizer(),
                          "train.device");
}

TrainJobConfig parseTrainJobConfig(const std::string& tomlText, const std::vector<std::string>& overrides,
                                   const std::string& sourceName) {
  const toml::table root = parseToml(tomlText, sourceName);
  std::vector<Override> parsed;
  for (const auto& text : overrides) parsed.push_back(parseOverride(text));

  // model.kind decides which [model] keys exist, so it is read first.
  TrainJobConfig config;
  if (const toml::node* kind = root.at_path("model.kind").node()) assign(*kind, &config.model.kind, "model.kind");
  for (const auto& o : parsed) {
    if (o.section == "model" && o.key == "kind") assign(*o.value.get("v"), &config.model.kind, "model.kind");
  }
  TESSERA_CHECK_CONFIG(config.model.kind == "gpt" || config.model.kind == "mlp", "model.kind",
                       "got '" << config.model.kind << "' (valid: gpt, mlp)");

  for (const auto& [section, node] : root) applySection(config, std::string(section.str()), node);
  for (const auto& o : parsed) {
    if (!schemaOf(config).count(o.section)) {
      throw ConfigError(o.section, std::string("unknown section (valid: ") + kSectionNames + ")");
    }
    applyKey(config, o.section, o.key, *o.value.get("v"));
  }
  config.optim.name = config.optimizer == "diloco" ? config.diloco_inner
                     : (config.optimizer == "sgd" ? "sgd" : "adamw");
  config.validate();
  return config;
}

comm::FaultPlan runFaultPlan(const TrainJobConfig& job, const std::string& flag) {
  std::string text = job.fault_plan;
  if (!flag.empty()) text += (text.empty() ? "" : ";") + flag;
  if (const char* env = std::getenv("TESSERA_FAULT_PLAN")) {
    if (*env != '\0') text += (text.empty() ? "" : ";") + std::string(env);
  }
  if (text.empty()) return {};
  try {
    return comm::FaultPlan::parse(text);
  } catch (const InvalidArgument& e) {
    throw ConfigError("faults.plan", e.what());
  }
}

TrainJobConfig loadTrainJobConfig(const std::string& path, const std::vector<std::string>& overrides) {
  std::ifstream in(path);
  TESSERA_CHECK_ARG(in.good(), "cannot read the config file '" << path << "'");
  std::ostringstream text;
  text << in.rdbuf();
  return parseTrainJobConfig(text.str(), overrides, path);
}

}  // namespace tessera::launcher
